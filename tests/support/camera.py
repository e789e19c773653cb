"""The synthetic RTSP camera (gst-rtsp-server) as a test fixture."""

from __future__ import annotations

import re
from pathlib import Path

from tests.support.net import free_port
from tests.support.processes import ManagedProcess

CAMERA_SCRIPT = Path(__file__).resolve().parents[2] / "tunnel_agent" / "sim" / "rtsp_camera.py"
SYSTEM_PYTHON = "/usr/bin/python3"


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
        self.port = port or free_port(host)
        self.user = user
        self.password = password
        self.path = "/test"
        self.record_path = record_path
        args = [SYSTEM_PYTHON, str(CAMERA_SCRIPT), "--host", host, "--port", str(self.port)]
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
        args, folder, env = self._start
        suffix = f"-restart-{self.restarts}" if self.restarts else ""
        process = ManagedProcess(args, folder / f"camera-{self.port}{suffix}.log", env=env)
        process.wait_for(lambda out: "READY" in out, timeout_s=20)
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
