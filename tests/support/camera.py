"""The synthetic RTSP camera (gst-rtsp-server) as a test fixture."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

from tests.support.processes import ManagedProcess

CAMERA_SCRIPT = Path(__file__).resolve().parents[2] / "tunnel_agent" / "sim" / "rtsp_camera.py"
SYSTEM_PYTHON = "/usr/bin/python3"
READY = re.compile(r"^READY (\d+)$", re.M)
_launches = itertools.count(1)


class RtspCamera:
    def __init__(
        self,
        folder: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        user: str | None = None,
        password: str | None = None,
        auth: str = "basic",
        record_path: str | None = None,
        extra: list[str] | None = None,
    ) -> None:
        self.host = host
        self.port = port or 0  # 0: the camera binds a port of the kernel's choosing and says which
        self.user = user
        self.password = password
        self.path = "/test"
        self.record_path = record_path
        args = [SYSTEM_PYTHON, str(CAMERA_SCRIPT), "--host", host]
        if user:
            args += ["--user", user, "--auth", auth]
        if record_path:
            args += ["--record-path", record_path]
        args += extra or []
        env = {"RTSP_CAMERA_PASSWORD": password} if password else None
        folder.mkdir(parents=True, exist_ok=True)
        self._start = (args, folder, env)
        self.restarts = 0
        self.process = self._launch()

    def _launch(self) -> ManagedProcess:
        """The camera on ``self.port``; the first start, with port 0, learns its port from the
        camera's ``READY <port>`` line: a port picked here and bound later by the camera could
        be taken in between (by any process's outgoing connection, the same port range)."""
        args, folder, env = self._start
        suffix = f"-restart-{self.restarts}" if self.restarts else ""
        name = self.port or f"new-{next(_launches)}"
        process = ManagedProcess(
            [*args, "--port", str(self.port)], folder / f"camera-{name}{suffix}.log", env=env
        )
        ready = READY.search(process.wait_for(lambda out: bool(READY.search(out)), timeout_s=20))
        assert ready is not None
        self.port = int(ready.group(1))
        return process

    def restart_if_dead(self) -> str | None:
        """Start the camera again if it has exited; the end of its log if it had.

        gst-rtsp-server can abort on an assertion of its own (``gst_rtsp_media_get_rates``) while
        clients come and go; a camera shared by many tests must not take every later test down
        with it."""
        if self.process.process.poll() is None:
            return None
        last_words = self.process.output()[-2000:]
        self.restarts += 1
        self.process = self._launch()
        return last_words

    def url(
        self, *, with_credentials: bool = False, host: str | None = None, port: int | None = None
    ) -> str:
        auth = f"{self.user}:{self.password}@" if with_credentials and self.user else ""
        return f"rtsp://{auth}{host or self.host}:{port or self.port}{self.path}"

    def recorded_frames(self) -> int:
        counts = re.findall(r"RECORD (\d+)", self.process.output())
        return int(counts[-1]) if counts else 0

    def stop(self) -> None:
        self.process.stop()
