"""Child processes for tests: started with a log file, stopped for sure."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

STARTED: list[ManagedProcess] = []


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
            self.args,
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

    def stop(self, timeout_s: float = 10.0) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        self._log.close()
        return self.process.returncode


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
