"""The agent's tunnel: the camera's TCP connection (near end) pumped to the cloud's WebSocket."""

from __future__ import annotations

from picows import WSTransport

from tunnel_agent.logs import EventLogger
from tunnel_agent.tunnel.pump import Pump, PumpLimits, StreamEnd, WebSocketEnd
from tunnel_agent.tunnel.targets import CameraTarget


class Tunnel(Pump):
    """One camera connection bridged to one WebSocket, with what the closing log line says."""

    def __init__(
        self,
        tunnel_id: str,
        target: CameraTarget,
        endpoint_display: str,
        limits: PumpLimits,
        log: EventLogger,
    ) -> None:
        self.camera = StreamEnd("camera")
        self.remote = WebSocketEnd("remote")
        super().__init__(self.camera, self.remote, limits, log)
        self.id = tunnel_id
        self.target = target
        self.endpoint_display = endpoint_display

    @property
    def ws(self) -> WSTransport | None:
        return self.remote.ws

    @property
    def bytes_to_remote(self) -> int:
        return self.remote.bytes_written

    @property
    def bytes_to_camera(self) -> int:
        return self.camera.bytes_written
