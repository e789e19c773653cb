"""The agent's side of a re-stream publisher process (``tunnel_agent.media.publisher``).

Every wait on the process is bounded and releases the GIL (``select`` on its pipes), so a media
server that never answers costs the task's thread its time, not the agent's. ``kill`` may be
called from any thread: it ends a wait in progress at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import subprocess
import sys
import threading
import time
from typing import Any

PIPE_BYTES = 1 << 20  # a few seconds of video between the task and its publisher
EXIT_WAIT_S = 5.0  # a closing publisher sends its TEARDOWN; then it is killed


class PublisherError(Exception):
    """The publisher failed or went away; ``opened`` tells a lost session from a refused one."""

    def __init__(self, reason: str, *, opened: bool) -> None:
        super().__init__(reason)
        self.opened = opened


class PublisherProcess:
    def __init__(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "tunnel_agent.media.publisher"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            close_fds=True,
        )
        assert self._process.stdin is not None and self._process.stdout is not None
        self._to = self._process.stdin.fileno()
        self._from = self._process.stdout.fileno()
        with contextlib.suppress(OSError):  # a smaller pipe only makes writes wait sooner
            fcntl.fcntl(self._to, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        os.set_blocking(self._to, False)
        self._answers = b""
        self._opened = False
        self._killed = threading.Event()

    def open(self, frames: bytes, timeout_s: float) -> dict[str, Any]:
        """Send the OPEN and TEMPLATE frames and wait for the server to accept the session."""
        self.send(frames, timeout_s)
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._answers:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                raise PublisherError(f"no answer within {timeout_s:.0f} s", opened=False)
            readable, _, _ = select.select([self._from], [], [], remaining)
            if readable and not self._read():
                break
        document = self._next_answer()
        if document.get("connected"):
            self._opened = True
            return document
        raise self._failure(document)

    def send(self, data: bytes, timeout_s: float) -> None:
        """Write ``data`` to the publisher, waiting at most ``timeout_s`` for room in the pipe."""
        view = memoryview(data)
        deadline = time.monotonic() + timeout_s
        while view:
            try:
                view = view[os.write(self._to, view) :]
                continue
            except BlockingIOError:
                pass
            except (BrokenPipeError, ValueError, OSError):
                raise self._failure(self._last_words()) from None
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._killed.is_set():
                self.kill()
                raise PublisherError(
                    f"the publisher took nothing for {timeout_s:.0f} s", opened=self._opened
                )
            select.select([], [self._to], [], min(remaining, 1.0))

    def close(self) -> None:
        """End the session cleanly (the publisher closes its output), killing it if it hangs."""
        with contextlib.suppress(OSError):
            assert self._process.stdin is not None
            self._process.stdin.close()
        try:
            self._process.wait(EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            self.kill()
        self._release()

    def kill(self) -> None:
        self._killed.set()
        with contextlib.suppress(OSError):
            self._process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(EXIT_WAIT_S)

    def _read(self) -> bool:
        try:
            chunk = os.read(self._from, 4096)
        except OSError:
            return False
        self._answers += chunk
        return bool(chunk)

    def _next_answer(self) -> dict[str, Any]:
        line, _, self._answers = self._answers.partition(b"\n")
        try:
            document = json.loads(line) if line else {}
        except ValueError:
            document = {}
        return document if isinstance(document, dict) else {}

    def _last_words(self) -> dict[str, Any]:
        """What a publisher that went away said last (it exits right after its error)."""
        deadline = time.monotonic() + EXIT_WAIT_S
        while (remaining := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([self._from], [], [], remaining)
            if not readable or not self._read():
                break
        words: dict[str, Any] = {}
        while self._answers:
            words = self._next_answer() or words
        return words

    def _failure(self, document: dict[str, Any]) -> PublisherError:
        stopped = self._killed.is_set()
        self.kill()
        self._release()
        error = document.get("error")
        if error is None:
            error = "stopped" if stopped else f"the publisher exited ({self._process.returncode})"
        return PublisherError(str(error), opened=bool(document.get("opened", self._opened)))

    def _release(self) -> None:
        for pipe in (self._process.stdin, self._process.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
