"""Child processes for tests: started with a log file, stopped for sure."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

STARTED: list[ManagedProcess] = []


def dying_with_parent(args: Sequence[str]) -> list[str]:
    """``args`` run so that the kernel SIGKILLs the child when the test process dies.

    This covers a test run killed outright (SIGKILL, the OOM killer), where no fixture or
    ``finally`` runs. ``setpriv`` (util-linux) sets the signal and execs ``args``, so no Python
    runs between fork and exec in a process with threads. The kernel ties the signal to the
    *thread* that forks, so it is set only from the main thread: a child started from a worker
    thread would die with that thread.
    """
    if threading.current_thread() is not threading.main_thread():
        return list(args)
    return ["setpriv", "--pdeathsig", "KILL", "--", *args]


def group_members(group: int) -> list[int]:
    """The processes still in process group ``group``."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            members.append(int(entry))
    return members


def stop_all() -> None:
    """Safety net at the end of a session: nothing a test started outlives the run."""
    for process in STARTED:
        process.stop(timeout_s=5)


class ManagedProcess:
    def __init__(
        self,
        args: Sequence[str],
        log_file: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.args = list(args)
        self.log_file = log_file
        self._log = log_file.open("ab")
        self.process = subprocess.Popen(
            dying_with_parent(self.args),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,
        )
        STARTED.append(self)

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_file.read_text(errors="replace")

    def wait_for(self, predicate: Callable[[str], bool], timeout_s: float = 20.0) -> str:
        """Wait until the output satisfies ``predicate``; fail with the output if it does not."""
        deadline = time.monotonic() + timeout_s
        while True:
            text = self.output()
            if predicate(text):
                return text
            if self.process.poll() is not None:
                raise AssertionError(
                    f"{self.args[0]} exited ({self.process.returncode}):\n{text[-4000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting on {self.args[0]}:\n{text[-4000:]}")
            time.sleep(0.05)

    def signal(self, sig: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crash or a power cut would end it."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)

    def wait(self, timeout_s: float) -> int:
        return self.process.wait(timeout_s)

    def stop(self, timeout_s: float = 10.0, *, whole_group: bool = False) -> int | None:
        """SIGTERM (to every process of the group with ``whole_group``), SIGKILL if it lingers."""
        if self._log.closed:
            return self.process.returncode
        if self.process.poll() is None:
            if whole_group:
                os.killpg(self.process.pid, signal.SIGTERM)
            else:
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        self._end_leftovers()
        self._log.close()
        return self.process.returncode

    def _end_leftovers(self, grace_s: float = 2.0) -> None:
        """Children the process left in its group get ``grace_s`` to follow it (danted's do,
        once they see their parent gone); any still there are killed, and the run hears of it."""
        deadline = time.monotonic() + grace_s
        while leftovers := group_members(self.process.pid):
            if time.monotonic() > deadline:
                warnings.warn(
                    f"{self.args[0]} left {len(leftovers)} process(es) in its group; killed them",
                    stacklevel=3,
                )
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                return
            time.sleep(0.05)


def in_private_mounts(mount: str, argument: Path, command: list[str]) -> list[str]:
    """``command`` run in its own mount namespace after the shell ``mount`` (``$0`` is
    ``argument``), so a test can change the world one process sees without touching the host's."""
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        f'{mount} && exec "$@"',
        str(argument),
        *command,
    ]
