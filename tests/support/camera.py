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
        self.process = ManagedProcess(args, folder / f"camera-{self.port}.log", env=env)
        self.process.wait_for(lambda out: "READY" in out, timeout_s=20)

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
