"""The relay's tunnel: a consumer (TCP or WebSocket) pumped to the device's WebSocket.

It is the shared pump (tunnel/pump.py) with the relay's own parts: which route or session it
serves, the device's end that arrives later through ``/v1/tunnels/<id>``, and, for RTSP, the
steering filter that sits in the pump's ``forward`` until PLAY and then takes itself out.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from picows import WSFrame, WSMsgType, WSTransport

from tunnel_agent.cloud.relay.rtsp_steering import RtspSteering
from tunnel_agent.cloud.relay.sessions import Session
from tunnel_agent.cloud.relay.sources import Network
from tunnel_agent.logs import EventLogger
from tunnel_agent.tunnel.pump import (
    BULK_FRAME_BYTES,
    MAX_SEND_FRAME_BYTES,
    End,
    Pump,
    PumpLimits,
    WebSocketEnd,
)


@dataclass(eq=False)
class Route:
    """A fixed consumer port from the configuration."""

    id: str
    device_id: str
    local_port: int
    protocol: str
    allowed_sources: tuple[Network, ...]
    host: str
    port: int
    kind: str = "route"

    def describe(self) -> dict[str, object]:
        return {
            "id": self.id,
            "deviceId": self.device_id,
            "localPort": self.local_port,
            "protocol": self.protocol,
            "address": f"{self.host}:{self.port}",
            "allowedSources": [str(n) for n in self.allowed_sources],
        }


Entry = Route | Session


class RelayTunnel(Pump):
    """One consumer connection, the tunnelOpen it caused, and the device WebSocket it waits for."""

    def __init__(
        self,
        tunnel_id: str,
        entry: Entry,
        consumer: End,
        source: str,
        *,
        limits: PumpLimits,
        log: EventLogger,
    ) -> None:
        self.device = DeviceEnd("device")
        super().__init__(consumer, self.device, limits, log)
        self.id = tunnel_id
        self.entry = entry
        self.source = source
        self.requested_at = time.monotonic()
        self.open_rtt_ms: float | None = None
        self.device_arrived: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.steering: RtspSteering | None = None
        self.failed = False  # the opening failed and said so: no closing line

    @property
    def consumer(self) -> End:
        return self.near

    @property
    def bytes_to_device(self) -> int:
        return self.device.bytes_written

    @property
    def bytes_to_consumer(self) -> int:
        return self.near.bytes_written

    def end_connected(self, end: End) -> None:
        if end is self.device:
            if not self.device_arrived.done():
                self.device_arrived.set_result(None)
            self.start()

    def attach_filters(self) -> None:
        if self.entry.protocol == "rtsp":
            self.steering = RtspSteering()
            SteeringFilter(self.steering, self.near, self.device).attach()


class DeviceEnd(WebSocketEnd):
    """The device's WebSocket, whose frames leave for the consumer one send per camera chunk.

    Our agents cut a camera read into frames of one TLS record (``MAX_SEND_FRAME_BYTES``), so a
    frame of exactly that size is followed by the rest of its chunk, usually in the same read
    cycle but not always in the same read (the relay's reads stop where picows's buffer would
    grow). Such a frame that ends a read waits, until the next frame joins it or, at the latest,
    until the loop has finished this read cycle: one send to the consumer instead of two.
    """

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._flush: asyncio.Handle | None = None

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if (
            frame.last_in_buffer
            and frame.msg_type == WSMsgType.BINARY
            and frame.payload_size == MAX_SEND_FRAME_BYTES
            and self._batch_bytes + MAX_SEND_FRAME_BYTES < BULK_FRAME_BYTES
        ):
            self.heard_at = time.monotonic()
            self._batch.append(frame.get_payload_as_bytes())
            self._batch_bytes += MAX_SEND_FRAME_BYTES
            if self._flush is None:
                self._flush = asyncio.get_running_loop().call_soon(self._flush_held)
            return
        super().on_ws_frame(transport, frame)

    def _flush_held(self) -> None:
        self._flush = None
        if self._batch:
            self._forward_batch()


class SteeringFilter:
    """The I/O shell around :class:`RtspSteering`: it sits in both ends' ``forward`` until the
    machine is done with each direction, then puts the plain ``write`` back."""

    def __init__(self, machine: RtspSteering, consumer: End, device: WebSocketEnd) -> None:
        self.machine = machine
        self.consumer = consumer
        self.device = device

    def attach(self) -> None:
        self.consumer.forward = self.from_consumer
        self.device.forward = self.from_camera

    def from_consumer(self, data: bytes) -> None:
        steered = self.machine.from_consumer(data)
        if steered.to_consumer:
            self.consumer.write(steered.to_consumer)
        if steered.to_camera:
            self.device.write(steered.to_camera)
        if self.machine.consumer_done and self.consumer.forward == self.from_consumer:
            self.consumer.forward = self.device.write

    def from_camera(self, data: bytes) -> None:
        out = self.machine.from_camera(data)
        if out:
            self.consumer.write(out)
        if self.machine.camera_done and self.device.forward == self.from_camera:
            self.device.forward = self.consumer.write
