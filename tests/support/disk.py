"""A small disk for one agent: a tmpfs of a few MiB in the agent's own mount namespace.

The test fills and frees it through ``/proc/<pid>/root``, which shows the agent's mounts, so
nothing is mounted on the machine itself and the disk goes away with the agent.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.support.processes import in_private_mounts


class SmallDisk:
    def __init__(self, mount_point: Path, size_bytes: int) -> None:
        self.mount_point = mount_point
        self.size_bytes = size_bytes
        mount_point.mkdir(parents=True, exist_ok=True)

    def wrap(self, command: list[str]) -> list[str]:
        mount = f'mount -t tmpfs -o size={self.size_bytes} tmpfs "$0"'
        return in_private_mounts(mount, self.mount_point, command)

    def seen_by(self, pid: int) -> Path:
        """The disk as the process ``pid`` sees it."""
        return Path(f"/proc/{pid}/root{self.mount_point}")

    def free_bytes(self, pid: int) -> int:
        stats = os.statvfs(self.seen_by(pid))
        return stats.f_bavail * stats.f_frsize
