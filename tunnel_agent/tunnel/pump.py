"""The one byte pump: a TCP stream or a WebSocket joined to a WebSocket, on transport callbacks.

The same job happens in three places: the agent (camera TCP <-> WebSocket to the cloud), the relay
(consumer TCP or consumer WebSocket <-> the device's WebSocket) and ``tunnel-agent connect`` (local
TCP <-> WebSocket to the relay). Each place builds a :class:`Pump` from two ends, a *near* one
(:class:`StreamEnd` or :class:`WebSocketEnd`) and a *far* one (a :class:`WebSocketEnd`), and adds
only what is its own (naming, opening, bookkeeping) around it.

Why callbacks and not read/await loops: every chunk crosses in one call (``data_received`` ->
``send``) with no task switch, which is what lets Python keep up with socat. Each end hands what it
reads to ``forward``, which is the other end's ``write`` (or, for a while, a filter such as the
relay's RTSP steering, which puts ``write`` back when it is done: no cost per byte after that).
Backpressure is the transports' own flow control: when one end's write buffer passes its
high-water mark the other end stops reading until it drains, so at most one read's worth of data
waits per direction.

A pump holds no tasks, only one timer. Whatever ends it (either end closing, an error, a timeout,
shutdown) goes through :meth:`Pump.close`: a stream is flushed and closed, a WebSocket gets a
CLOSE frame after the data already queued and is disconnected when the peer answers it; anything
still open after ``close_timeout`` is aborted. :attr:`Pump.closed` resolves once both are gone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import cast

import picows
from picows import WSCloseCode, WSFrame, WSMsgType, WSTransport

from tunnel_agent.logs import EventLogger

# Per-transport write buffer: enough to keep a fast link busy, small enough to bound memory.
WRITE_BUFFER_HIGH_BYTES = 256 * 1024
WRITE_BUFFER_LOW_BYTES = 64 * 1024
# The largest frame payload a pump sends, bulk aside: with a client's 8-byte header (masked,
# 16-bit length) a frame is one TLS record. A peer's WebSocket reader keeps a buffer as large as the
# largest frame it ever held (picows never shrinks it), so a camera's backlog read in one go and
# sent as one 128 KiB frame would cost the relay that much per tunnel for good.
MAX_SEND_FRAME_BYTES = 16 * 1024 - 8
# Bulk: at least this many bytes within BULK_WINDOW_S. Split into records, bulk costs the agent
# ~10 % more CPU per byte and the relay more, and a bulk tunnel's buffers are large on every hop
# anyway; so a pump moving bulk sends frames as large as its reads (up to BULK_FRAME_BYTES), and
# the many camera-rate tunnels (4 Mbit/s is 0.5 MB/s) keep one record per frame.
BULK_WINDOW_BYTES = 1024 * 1024
BULK_WINDOW_S = 0.25
BULK_FRAME_BYTES = 256 * 1024  # asyncio's read size
_PING_PAYLOAD = b"tunnel-agent"
_DATA_FRAMES = (WSMsgType.BINARY, WSMsgType.CONTINUATION, WSMsgType.TEXT)
_MAX_CLOSE_MESSAGE_BYTES = 120  # a CLOSE frame's payload is at most 125 bytes, code included


@dataclass(frozen=True)
class PumpLimits:
    """Keep-alive and lifetime rules for one pump, in seconds (0 disables a limit)."""

    ping_interval_s: float = 20.0
    ping_timeout_s: float = 60.0
    idle_timeout_s: float = 0.0
    max_lifetime_s: float = 0.0
    close_timeout_s: float = 2.0


Forward = Callable[[bytes], None]


class StreamEnd(asyncio.Protocol):
    """A TCP connection as one end of a pump; reading stays paused until the pump starts.

    ``on_connected``, if given, is told when the connection is made (a listener's way to decide
    about an accepted connection, as the relay and ``connect`` do)."""

    def __init__(self, name: str, on_connected: Callable[[StreamEnd], None] | None = None) -> None:
        self.name = name
        self.on_connected = on_connected
        self.pump: Pump | None = None
        self.transport: asyncio.Transport | None = None
        self.forward: Forward = _drop
        self.bytes_written = 0
        self.gone = False
        self.write_paused = False
        self._read_paused = False
        self._transport_write: Forward = _drop

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._transport_write = self.transport.write
        self.transport.set_write_buffer_limits(WRITE_BUFFER_HIGH_BYTES, WRITE_BUFFER_LOW_BYTES)
        self.transport.pause_reading()
        self._read_paused = True
        if self.on_connected is not None:
            self.on_connected(self)

    def data_received(self, data: bytes) -> None:
        self.forward(data)

    def eof_received(self) -> bool:
        if self.pump is not None:
            self.pump.close(f"{self.name} closed", WSCloseCode.OK)
        return True  # keep our write side open until close() flushes it

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        pump = self.pump
        if pump is not None:
            if pump.close_reason is None:
                reason = (
                    f"{self.name} closed" if exc is None else f"{self.name} error: {_describe(exc)}"
                )
                pump.close(reason, WSCloseCode.OK if exc is None else WSCloseCode.INTERNAL_ERROR)
            pump.end_gone()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.pump is not None:
            self.pump.other(self).pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.pump is not None:
            self.pump.other(self).resume_reading()

    # -- as an end ----------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.transport is not None

    def write(self, data: bytes) -> None:
        self._transport_write(data)
        self.bytes_written += len(data)

    def pause_reading(self) -> None:
        if not self._read_paused and self.transport is not None and not self.gone:
            self._read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._read_paused and self.transport is not None and not self.gone:
            self._read_paused = False
            self.transport.resume_reading()

    def begin_close(self, code: WSCloseCode, message: str | None = None) -> None:
        if self.transport is None:
            self.gone = True
        elif not self.gone:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.gone:
            self.transport.abort()

    def heard_from(self, now: float) -> None:
        """Streams need no proof of life: TCP tells us when they go."""

    def ping(self) -> None:
        """Streams are not pinged."""


class WebSocketEnd(picows.WSListener):
    """A WebSocket (client or server side) as one end of a pump; its frames carry the bytes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.pump: Pump | None = None
        self.ws: WSTransport | None = None
        self.forward: Forward = self._hold
        self.bytes_written = 0
        self.gone = False
        self.write_paused = False
        self.heard_at = time.monotonic()
        self.close_received = False
        self._read_paused = False
        self._held: list[bytes] = []
        self._batch: list[bytes] = []
        self._batch_bytes = 0
        self._bulk = False
        self._window_bytes = 0
        self._window_started = time.monotonic()
        self._send: Callable[[bytes | memoryview], None] = _drop

    # -- picows.WSListener --------------------------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        # Frames (even a CLOSE) can arrive in the same read as the handshake, before the code
        # that made the connection runs again: the end must know its WebSocket from now on.
        self.ws = transport
        self._send = partial(transport.send, WSMsgType.BINARY)
        transport.underlying_transport.set_write_buffer_limits(
            WRITE_BUFFER_HIGH_BYTES, WRITE_BUFFER_LOW_BYTES
        )
        self.heard_at = time.monotonic()
        pump = self.pump
        if pump is not None and pump.close_reason is not None:
            transport.disconnect(graceful=False)  # the pump closed while this was connecting
        elif pump is not None:
            pump.end_connected(self)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        self.heard_at = time.monotonic()
        msg_type = frame.msg_type
        if msg_type in _DATA_FRAMES:
            payload = frame.get_payload_as_bytes()
            if len(payload) > MAX_SEND_FRAME_BYTES or (frame.last_in_buffer and not self._batch):
                if self._batch:
                    self._forward_batch()
                self.forward(payload)  # as it came: a bulk frame, or a read's only frame
                return
            self._batch.append(payload)
            self._batch_bytes += len(payload)
            if frame.last_in_buffer or self._batch_bytes >= BULK_FRAME_BYTES:
                self._forward_batch()
            return
        if self._batch:
            self._forward_batch()
        if msg_type == WSMsgType.CLOSE:
            self.close_received = True
            pump = self.pump
            if pump is not None and pump.close_reason is None:
                code = _close_code_number(frame.get_close_code())
                pump.close(f"{self.name} closed ({code})", WSCloseCode.OK)
            else:
                transport.disconnect(graceful=True)

    def _forward_batch(self) -> None:
        """The small frames one read brought go on as one write: one send, not one per frame."""
        batch, self._batch = self._batch, []
        self._batch_bytes = 0
        self.forward(b"".join(batch))

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.gone = True
        pump = self.pump
        if pump is not None:
            if pump.close_reason is None:
                pump.close(f"{self.name} connection lost")
            pump.end_gone()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.pump is not None:
            self.pump.other(self).pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.heard_at = time.monotonic()  # the peer took what was waiting: it is alive
        if self.pump is not None:
            self.pump.other(self).resume_reading()

    # -- as an end ----------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.ws is not None

    def write(self, data: bytes) -> None:
        size = len(data)
        self.bytes_written += size
        self._window_bytes += size
        if self._window_bytes >= BULK_WINDOW_BYTES:
            now = time.monotonic()
            self._bulk = now - self._window_started < BULK_WINDOW_S
            self._window_started = now
            self._window_bytes = 0
        if size <= MAX_SEND_FRAME_BYTES or (self._bulk and size <= BULK_FRAME_BYTES):
            self._send(data)
            return
        frame_bytes = BULK_FRAME_BYTES if self._bulk else MAX_SEND_FRAME_BYTES
        view = memoryview(data)
        for start in range(0, size, frame_bytes):
            self._send(view[start : start + frame_bytes])

    def _hold(self, data: bytes) -> None:
        """Frames that arrive before the pump starts (with the handshake) wait for it."""
        self._held.append(data)
        self.pause_reading()

    def release_held(self) -> list[bytes]:
        held, self._held = self._held, []
        return held

    def pause_reading(self) -> None:
        ws = self.ws
        if not self._read_paused and ws is not None and not ws.is_disconnected:
            self._read_paused = True
            ws.underlying_transport.pause_reading()

    def resume_reading(self) -> None:
        ws = self.ws
        if self._read_paused and ws is not None and not ws.is_disconnected:
            self._read_paused = False
            ws.underlying_transport.resume_reading()

    def begin_close(self, code: WSCloseCode, message: str | None = None) -> None:
        ws = self.ws
        if ws is None:
            self.gone = True
        elif not ws.is_disconnected:
            if not ws.is_close_frame_sent:
                ws.send_close(
                    code, message.encode()[:_MAX_CLOSE_MESSAGE_BYTES] if message else None
                )
            if self.close_received:
                ws.disconnect(graceful=True)
            # else the peer's CLOSE completes the handshake (on_ws_frame), or the abort timer fires

    def abort(self) -> None:
        if self.ws is not None and not self.ws.is_disconnected:
            self.ws.disconnect(graceful=False)

    def heard_from(self, now: float) -> None:
        self.heard_at = now

    def protocol_error(self) -> None:
        """picows closed this WebSocket for a protocol error (a frame over the size limit)."""
        pump = self.pump
        if pump is not None and pump.close_reason is None:
            pump.abort(f"{self.name} broke the WebSocket protocol (frame too large?)")

    def ping(self) -> None:
        if self.ws is not None and not self.ws.is_disconnected:
            self.ws.send_ping(_PING_PAYLOAD)


End = StreamEnd | WebSocketEnd


class Pump:
    """Two ends, the bytes between them, and the one way it all ends.

    The near end is usually connected first; the far end is always a WebSocket. Bytes start to
    move at :meth:`start` once both are connected; until then the near end does not read.
    """

    def __init__(self, near: End, far: WebSocketEnd, limits: PumpLimits, log: EventLogger) -> None:
        self.near = near
        self.far = far
        self.limits = limits
        self.log = log
        near.pump = far.pump = self
        self.opened_at = time.monotonic()
        self.started = False
        self.close_reason: str | None = None
        self._loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self._timer: asyncio.TimerHandle | None = None
        self._abort_timer: asyncio.TimerHandle | None = None
        self._last_activity = self.opened_at
        self._moved_at_last_tick = 0
        self._written_at_last_tick = [0, 0]
        self._last_ping = self.opened_at

    def other(self, end: End) -> End:
        return self.far if end is self.near else self.near

    @property
    def ends(self) -> tuple[End, WebSocketEnd]:
        return self.near, self.far

    # -- life cycle ---------------------------------------------------------------------------

    def end_connected(self, end: End) -> None:
        """A WebSocket end finished its handshake; subclasses may start the pump from here."""

    def start(self) -> None:
        """Both ends are connected: start moving bytes and checking the links."""
        if self.close_reason is not None or self.started:
            return  # closed during the handshake; close() is already taking both ends down
        self.started = True
        now = time.monotonic()
        self.opened_at = self._last_activity = self._last_ping = now
        near, far = self.near, self.far
        far.heard_at = now
        if isinstance(near, WebSocketEnd):
            near.heard_at = now
        near_held = near.release_held() if isinstance(near, WebSocketEnd) else []
        far_held = far.release_held()
        near.forward = far.write
        far.forward = near.write
        self.attach_filters()
        for data in near_held:
            near.forward(data)
        for data in far_held:
            far.forward(data)
        near.resume_reading()
        far.resume_reading()
        self._timer = self._loop.call_later(self._tick_interval(), self._tick)

    def attach_filters(self) -> None:
        """Subclasses may put a filter into ``forward`` here (the relay's RTSP steering)."""

    def close(
        self, reason: str, code: WSCloseCode = WSCloseCode.OK, message: str | None = None
    ) -> None:
        """End the pump: flush and close both ends; abort what is left after the timeout.

        ``message`` goes with the CLOSE frames: a reason the peer may see (no secrets)."""
        if self.close_reason is not None:
            return
        self.close_reason = reason
        if self._timer is not None:
            self._timer.cancel()
        for end in self.ends:
            end.forward = _drop
        for end in self.ends:
            end.begin_close(code, message)
        self._abort_timer = self._loop.call_later(self.limits.close_timeout_s, self._abort)
        self.end_gone()

    def go_away(self, reason: str) -> None:
        """Close because this process is stopping (WebSocket close code 1001)."""
        self.close(reason, WSCloseCode.GOING_AWAY)

    def abort(self, reason: str) -> None:
        """Drop both connections at once (used when a half-open pump must not linger)."""
        self.close(reason)
        self._abort()

    def _abort(self) -> None:
        for end in self.ends:
            end.abort()

    def end_gone(self) -> None:
        if self.near.gone and self.far.gone and not self.closed.done():
            if self._abort_timer is not None:
                self._abort_timer.cancel()
            self._abort_timer = None
            for end in self.ends:
                end.pump = None  # pump <-> end is a cycle: break it so that refcounting frees both
            self.closed.set_result(None)

    @property
    def duration_s(self) -> float:
        return time.monotonic() - self.opened_at

    # -- keep-alive and limits ----------------------------------------------------------------

    def _tick_interval(self) -> float:
        intervals = [self.limits.ping_interval_s]
        intervals += [t / 4 for t in (self.limits.idle_timeout_s, self.limits.max_lifetime_s) if t]
        return max(0.05, min(intervals))

    def _tick(self) -> None:
        """Ping, and close on a dead link, an idle pump or an expired lifetime.

        A busy link whose pongs wait behind bulk data is not dead: bytes that keep leaving towards
        a WebSocket (its writes are not paused) count as proof of life, as does any frame from it.
        """
        now = time.monotonic()
        limits = self.limits
        moved = 0
        for index, end in enumerate(self.ends):
            written = end.bytes_written
            moved += written
            if written != self._written_at_last_tick[index] and not end.write_paused:
                end.heard_from(now)
            self._written_at_last_tick[index] = written
        if moved != self._moved_at_last_tick:
            self._last_activity = now
        self._moved_at_last_tick = moved
        for end in self.ends:
            if isinstance(end, WebSocketEnd) and now - end.heard_at > limits.ping_timeout_s:
                self.abort("keepalive timeout")
                return
        if limits.idle_timeout_s and now - self._last_activity > limits.idle_timeout_s:
            self.close("idle timeout")
            return
        if limits.max_lifetime_s and now - self.opened_at > limits.max_lifetime_s:
            self.close("max lifetime reached", WSCloseCode.GOING_AWAY)
            return
        if now - self._last_ping >= limits.ping_interval_s:
            self._last_ping = now
            for end in self.ends:
                end.ping()
        self._timer = self._loop.call_later(self._tick_interval(), self._tick)


def _drop(data: bytes | memoryview) -> None:
    """Where bytes go when they have nowhere to go (before the start, after the close)."""


def _close_code_number(code: object) -> int:
    value = getattr(code, "value", code)
    return value if isinstance(value, int) else 0


def _describe(exc: BaseException) -> str:
    name = type(exc).__name__
    errno = getattr(exc, "errno", None)
    return f"{name} (errno {errno})" if errno else name
