"""The byte pump between the camera's TCP socket and the WebSocket, built on transport callbacks.

Why callbacks and not read/await loops: every chunk crosses in one call (``data_received`` ->
``send``) with no task switch, which is what lets a Python agent keep up with socat. Backpressure is
the transports' own flow control: when one side's write buffer passes its high-water mark the other
side stops reading until it drains, so at most one read's worth of data waits per direction.

A tunnel holds no tasks, only one timer. Whatever ends it (either side closing, an error, a
timeout, shutdown) goes through :meth:`Tunnel.close`: the camera socket is flushed and closed, the
WebSocket gets a CLOSE frame after the data already queued and is disconnected when the peer
answers it; anything still open after ``close_timeout`` is aborted. :attr:`Tunnel.closed` resolves
once both are gone.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import cast

import picows
from picows import WSCloseCode, WSFrame, WSMsgType, WSTransport

from tunnel_agent.logs import EventLogger
from tunnel_agent.tunnel.targets import CameraTarget

# Per-transport write buffer: enough to keep a fast link busy, small enough to bound memory.
WRITE_BUFFER_HIGH_BYTES = 256 * 1024
WRITE_BUFFER_LOW_BYTES = 64 * 1024
_PING_PAYLOAD = b"tunnel-agent"


@dataclass(frozen=True)
class PumpLimits:
    """Keep-alive and lifetime rules for one tunnel, in seconds (0 disables a limit)."""

    ping_interval_s: float = 20.0
    ping_timeout_s: float = 60.0
    idle_timeout_s: float = 0.0
    max_lifetime_s: float = 0.0
    close_timeout_s: float = 2.0


class CameraSide(asyncio.Protocol):
    """The camera's TCP connection; reading stays paused until the WebSocket is up."""

    def __init__(self, tunnel: Tunnel) -> None:
        self._tunnel = tunnel
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.pause_reading()
        self.transport.set_write_buffer_limits(WRITE_BUFFER_HIGH_BYTES, WRITE_BUFFER_LOW_BYTES)

    def data_received(self, data: bytes) -> None:
        self._tunnel.camera_data(data)

    def eof_received(self) -> bool:
        self._tunnel.close("camera closed", WSCloseCode.OK)
        return True  # keep our write side open until close() flushes it

    def connection_lost(self, exc: Exception | None) -> None:
        self._tunnel.camera_lost(exc)

    def pause_writing(self) -> None:
        self._tunnel.pause_remote_reading()

    def resume_writing(self) -> None:
        self._tunnel.resume_remote_reading()


class RemoteSide(picows.WSListener):
    """The WebSocket to the cloud; frames carry the camera's byte stream."""

    def __init__(self, tunnel: Tunnel) -> None:
        self._tunnel = tunnel

    def on_ws_connected(self, transport: WSTransport) -> None:
        # Frames (even a CLOSE) can arrive in the same read as the handshake answer, before
        # ws_connect returns: the tunnel must know its WebSocket from this moment on.
        self._tunnel.attach_remote(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        self._tunnel.remote_frame(frame)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self._tunnel.remote_lost()

    def pause_writing(self) -> None:
        self._tunnel.pause_camera_reading()

    def resume_writing(self) -> None:
        self._tunnel.resume_camera_reading()


class Tunnel:
    """One camera connection bridged to one WebSocket, with counters for the closing log line."""

    def __init__(
        self,
        tunnel_id: str,
        target: CameraTarget,
        endpoint_display: str,
        limits: PumpLimits,
        log: EventLogger,
    ) -> None:
        self.id = tunnel_id
        self.target = target
        self.endpoint_display = endpoint_display
        self.limits = limits
        self.log = log
        self.camera = CameraSide(self)
        self.remote = RemoteSide(self)
        self.ws: WSTransport | None = None
        self.bytes_to_remote = 0
        self.bytes_to_camera = 0
        self.opened_at = time.monotonic()
        self.close_reason: str | None = None
        self._loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self._camera_gone = False
        self._remote_gone = False
        self._camera_paused = True  # until start()
        self._remote_paused = False
        self._remote_close_received = False
        self._timer: asyncio.TimerHandle | None = None
        self._abort_timer: asyncio.TimerHandle | None = None
        self._last_proof_of_life = self.opened_at
        self._last_activity = self.opened_at
        self._bytes_at_last_tick = 0
        self._last_ping = self.opened_at

    # -- life cycle ---------------------------------------------------------------------------

    def attach_remote(self, ws: WSTransport) -> None:
        self.ws = ws
        ws.underlying_transport.set_write_buffer_limits(
            WRITE_BUFFER_HIGH_BYTES, WRITE_BUFFER_LOW_BYTES
        )

    def start(self) -> None:
        """Both ends are connected: start moving bytes and checking the link."""
        if self.close_reason is not None:
            return  # closed during the handshake; close() is already taking both sides down
        now = time.monotonic()
        self.opened_at = self._last_proof_of_life = self._last_activity = self._last_ping = now
        self.resume_camera_reading()
        self._timer = self._loop.call_later(self._tick_interval(), self._tick)

    def close(self, reason: str, code: WSCloseCode = WSCloseCode.OK) -> None:
        """End the tunnel: flush and close both sides; abort what is left after the timeout."""
        if self.close_reason is not None:
            return
        self.close_reason = reason
        if self._timer is not None:
            self._timer.cancel()
        ws = self.ws
        if ws is not None and not ws.is_disconnected:
            if not ws.is_close_frame_sent:
                ws.send_close(code)
            if self._remote_close_received:
                ws.disconnect(graceful=True)
            # else the peer's CLOSE completes the handshake (remote_frame), or the abort timer fires
        elif ws is None:
            self._remote_gone = True
        camera = self.camera.transport
        if camera is not None and not self._camera_gone:
            camera.close()
        elif camera is None:
            self._camera_gone = True
        self._abort_timer = self._loop.call_later(self.limits.close_timeout_s, self._abort)
        self._maybe_finished()

    def go_away(self, reason: str) -> None:
        """Close because the agent is stopping (WebSocket close code 1001)."""
        self.close(reason, WSCloseCode.GOING_AWAY)

    def abort(self, reason: str) -> None:
        """Drop both connections at once (used when a half-open tunnel must not linger)."""
        self.close(reason)
        self._abort()

    def _abort(self) -> None:
        if self.ws is not None and not self.ws.is_disconnected:
            self.ws.disconnect(graceful=False)
        if self.camera.transport is not None and not self._camera_gone:
            self.camera.transport.abort()

    def _maybe_finished(self) -> None:
        if self._camera_gone and self._remote_gone and not self.closed.done():
            if self._abort_timer is not None:
                self._abort_timer.cancel()
            self.closed.set_result(None)

    @property
    def duration_s(self) -> float:
        return time.monotonic() - self.opened_at

    # -- camera -> remote ---------------------------------------------------------------------

    def camera_data(self, data: bytes) -> None:
        ws = self.ws
        if ws is None or self.close_reason is not None:
            return
        ws.send(WSMsgType.BINARY, data)
        self.bytes_to_remote += len(data)

    def camera_lost(self, exc: Exception | None) -> None:
        self._camera_gone = True
        if self.close_reason is None:
            reason = "camera closed" if exc is None else f"camera error: {_describe(exc)}"
            self.close(reason, WSCloseCode.OK if exc is None else WSCloseCode.INTERNAL_ERROR)
        self._maybe_finished()

    def pause_camera_reading(self) -> None:
        if not self._camera_paused and self.camera.transport is not None:
            self._camera_paused = True
            self.camera.transport.pause_reading()

    def resume_camera_reading(self) -> None:
        if self._camera_paused and self.camera.transport is not None and not self._camera_gone:
            self._camera_paused = False
            self._last_proof_of_life = time.monotonic()
            self.camera.transport.resume_reading()

    # -- remote -> camera ---------------------------------------------------------------------

    def remote_frame(self, frame: WSFrame) -> None:
        self._last_proof_of_life = time.monotonic()
        msg_type = frame.msg_type
        if msg_type in (WSMsgType.BINARY, WSMsgType.CONTINUATION, WSMsgType.TEXT):
            camera = self.camera.transport
            if camera is not None and not self._camera_gone and self.close_reason is None:
                payload = frame.get_payload_as_bytes()
                camera.write(payload)
                self.bytes_to_camera += len(payload)
        elif msg_type == WSMsgType.CLOSE:
            self._remote_close_received = True
            if self.close_reason is None:
                code = _close_code_number(frame.get_close_code())
                self.close(f"remote closed ({code})", WSCloseCode.OK)
            elif self.ws is not None:
                self.ws.disconnect(graceful=True)

    def remote_lost(self) -> None:
        self._remote_gone = True
        if self.close_reason is None:
            self.close("remote connection lost")
        self._maybe_finished()

    def pause_remote_reading(self) -> None:
        if not self._remote_paused and self.ws is not None and not self.ws.is_disconnected:
            self._remote_paused = True
            self.ws.underlying_transport.pause_reading()

    def resume_remote_reading(self) -> None:
        if self._remote_paused and self.ws is not None and not self.ws.is_disconnected:
            self._remote_paused = False
            self.ws.underlying_transport.resume_reading()

    # -- keep-alive and limits ----------------------------------------------------------------

    def _tick_interval(self) -> float:
        intervals = [self.limits.ping_interval_s]
        intervals += [t / 4 for t in (self.limits.idle_timeout_s, self.limits.max_lifetime_s) if t]
        return max(0.05, min(intervals))

    def _tick(self) -> None:
        """Ping, and close on a dead link, an idle tunnel or an expired lifetime.

        A busy tunnel whose pongs wait behind bulk data is not dead: outbound bytes that keep
        leaving (the WebSocket is not paused) count as proof of life, as do any inbound frame.
        """
        now = time.monotonic()
        limits = self.limits
        moved = self.bytes_to_remote + self.bytes_to_camera
        if moved != self._bytes_at_last_tick:
            self._last_activity = now
            if not self._camera_paused:
                self._last_proof_of_life = now
        self._bytes_at_last_tick = moved
        if now - self._last_proof_of_life > limits.ping_timeout_s:
            self.abort("keepalive timeout")
            return
        if limits.idle_timeout_s and now - self._last_activity > limits.idle_timeout_s:
            self.close("idle timeout")
            return
        if limits.max_lifetime_s and now - self.opened_at > limits.max_lifetime_s:
            self.close("max lifetime reached", WSCloseCode.GOING_AWAY)
            return
        if now - self._last_ping >= limits.ping_interval_s and self.ws is not None:
            self._last_ping = now
            self.ws.send_ping(_PING_PAYLOAD)
        self._timer = self._loop.call_later(self._tick_interval(), self._tick)


def _close_code_number(code: object) -> int:
    value = getattr(code, "value", code)
    return value if isinstance(value, int) else 0


def _describe(exc: BaseException) -> str:
    name = type(exc).__name__
    errno = getattr(exc, "errno", None)
    return f"{name} (errno {errno})" if errno else name
