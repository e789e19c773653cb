"""A network namespace per test topology: a consumer that cannot be reached except through one link.

``consumer_namespace()`` creates a namespace with a veth pair to the host. The namespace has only
its loopback and its end of the pair; the host end carries the one address the consumer can
reach, so a server that should serve the consumer listens there. Nothing in the namespace can
reach the host's loopback, and nothing sent to the host's loopback (RTP over UDP from a camera,
say) can reach the namespace: as on a real network, only the path the test builds exists.

Names carry the pid and a counter (unique per process, at most 15 characters for interfaces);
addresses are link-local /30s (169.254.0.0/16, never 169.254.169.x) picked per process, so they
exist only on links this helper creates. Both are always removed, also when the test fails.
Needs root (CI runs as root) and iproute2.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

_counter = itertools.count()
_THIRD_OCTET = 64 + os.getpid() % 100  # 64..163: clear of 169.254.169.x
COMMAND_TIMEOUT_S = 10


def available() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


@dataclass(frozen=True)
class Namespace:
    name: str
    host_ip: str  # the host's end of the link: what the namespace can reach
    ip: str  # the namespace's own address, as the host sees connections from it

    def command(self, args: Sequence[str], *, user: int | None = None) -> list[str]:
        """``args`` run inside the namespace (as ``user``, a uid, if given: VLC refuses root)."""
        prefix = ["ip", "netns", "exec", self.name]
        if user is not None:
            prefix += ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
        return [*prefix, *args]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=COMMAND_TIMEOUT_S)


@contextlib.contextmanager
def consumer_namespace() -> Iterator[Namespace]:
    n = next(_counter)
    if n >= 63:
        raise RuntimeError("too many namespaces in one test session")
    pid = os.getpid()
    name = f"ta{pid}n{n}"
    host_end, inner_end = f"ta{pid}h{n}", f"ta{pid}c{n}"
    base = n * 4
    host_ip, inner_ip = f"169.254.{_THIRD_OCTET}.{base + 1}", f"169.254.{_THIRD_OCTET}.{base + 2}"
    try:
        _ip("netns", "add", name)
        _ip("link", "add", host_end, "type", "veth", "peer", "name", inner_end)
        _ip("link", "set", inner_end, "netns", name)
        _ip("addr", "add", f"{host_ip}/30", "dev", host_end)
        _ip("link", "set", host_end, "up")
        _ip("-n", name, "addr", "add", f"{inner_ip}/30", "dev", inner_end)
        _ip("-n", name, "link", "set", inner_end, "up")
        _ip("-n", name, "link", "set", "lo", "up")
        yield Namespace(name, host_ip, inner_ip)
    finally:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            _ip("link", "del", host_end)  # takes its peer with it
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            _ip("netns", "del", name)
