"""An asyncio RTSP publishing client: ANNOUNCE/RECORD to a media server, RTP interleaved over TCP.

It runs on the caller's event loop, so a media server that is slow or silent costs timers, never a
blocked thread: connecting (TCP and TLS) and each answer are bounded by ``request_timeout_s``. The
session is OPTIONS, ANNOUNCE (the SDP), SETUP (``interleaved=0-1;mode=record``), RECORD, kept
alive at half the server's session timeout and ended with TEARDOWN. Media goes in with ``send``,
one batch of framed RTP packets per call and so one socket write.

Writes are bounded twice. Bytes the kernel will not take (its send buffer is fixed at
``send_buffer_bytes``) wait in the transport's buffer up to ``max_queued_bytes``; past that the
publisher is ``congested`` and a batch offered meanwhile is refused (``refused_batches``: the
caller drops video until the next keyframe). And a buffer that sends nothing for
``write_timeout_s`` ends the session, as does the kernel when data stays unacknowledged that long
(``TCP_USER_TIMEOUT``): a server that stops reading is lost, not waited for.

Credentials go only in ``Authorization`` headers after the server asks (Digest when offered); no
error names them.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from typing import Unpack

from tunnel_agent.rtsp.connection import (
    MAX_REASON_CHARS,
    ConnectionOptions,
    Failure,
    RtspConnection,
)
from tunnel_agent.rtsp.errors import RtspError
from tunnel_agent.rtsp.messages import Response

TRACK_CONTROL = "streamid=0"


class PublishError(Exception):
    """The media server refused or lost the session; ``str(error)`` says why, without secrets."""


class RtspPublisher(RtspConnection, peer="the media server", error_type=PublishError):
    """One RECORD session: ``connect``, ``record`` with an SDP, ``send`` batches, ``close``."""

    def __init__(
        self,
        url: str,
        *,
        write_timeout_s: float = 10.0,
        max_queued_bytes: int = 1 << 20,
        send_buffer_bytes: int = 256 * 1024,
        **options: Unpack[ConnectionOptions],
    ) -> None:
        super().__init__(url, **options)
        self.write_timeout_s = write_timeout_s
        self.max_queued_bytes = max_queued_bytes
        self.send_buffer_bytes = send_buffer_bytes
        self._stall_check: asyncio.TimerHandle | None = None
        self._sent_at_check = 0
        self._progress_at = 0.0
        self.written_bytes = 0  # handed to the transport
        self.write_bounded = False  # the kernel bounds unacknowledged data too
        self.recording = False
        # Read from the caller's other threads: plain values, set on the loop only.
        self.congested = False
        self.refused_batches = 0  # each one broke the stream: it must start again at a keyframe
        self.error: str | None = None
        self.ended = asyncio.Event()

    # -- the session ----------------------------------------------------------------------------

    async def connect(
        self, host: str, port: int, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        """TCP (and TLS with ``ssl_context``, verifying the server as ``host``) within the bound."""
        loop = self._loop = asyncio.get_running_loop()
        handshake_timeout_s = self.request_timeout_s if ssl_context else None
        await self._open(loop, host, port, ssl_context, handshake_timeout_s)
        assert self._transport is not None
        self._transport.set_write_buffer_limits(self.max_queued_bytes, self.max_queued_bytes // 4)
        self.write_bounded = self._bound_socket()

    async def record(self, sdp: str) -> None:
        """OPTIONS, ANNOUNCE ``sdp``, SETUP its one track, RECORD; then keep the session alive."""
        await self._options(self.url)
        await self.request("ANNOUNCE", self.url, {"Content-Type": "application/sdp"}, sdp.encode())
        track = f"{self.url.rstrip('/')}/{TRACK_CONTROL}"
        answer = await self.request(
            "SETUP", track, {"Transport": "RTP/AVP/TCP;unicast;interleaved=0-1;mode=record"}
        )
        self._take_session(answer)
        await self.request("RECORD", self.url, {"Range": "npt=0.000-"})
        self.recording = True
        assert self._loop is not None
        self._start_keep_alive(self._loop)

    def send(self, data: bytes) -> bool:
        """Write one batch of framed RTP packets; False if refused (congested, or ended)."""
        transport = self._transport
        if transport is None or transport.is_closing() or self.error is not None:
            return False
        if self.congested:
            self.refused_batches += 1
            return False
        transport.write(data)
        self.written_bytes += len(data)
        if self._stall_check is None and transport.get_write_buffer_size():
            self._watch_progress()
        return True

    async def close(self) -> None:
        """TEARDOWN (briefly waited for), then close the connection."""
        self._stop_timers()
        await self._teardown()
        self.abort("the session was closed")

    def abort(self, reason: str) -> None:
        """End the session at once (from the loop): pending requests fail with ``reason``."""
        self._stop_timers()
        self._end(reason)
        if self._transport is not None:
            self._transport.abort()

    # -- how the publishing side words and ends things ----------------------------------------

    def _failure(self, kind: Failure, message: str) -> Exception:
        if kind == "closed":
            return PublishError(self.error or message)
        return PublishError(message)

    def _tls_failure(self, exc: ssl.SSLError) -> Exception:
        if isinstance(exc, ssl.SSLCertVerificationError):
            reason = exc.verify_message or "certificate verify failed"
            return PublishError(f"the media server's certificate is untrusted ({reason})")
        return PublishError(f"TLS with the media server failed ({exc.reason})")

    def _answer_failure(self, method: str, answer: Response) -> Exception:
        reason = answer.reason[:MAX_REASON_CHARS]
        return PublishError(f"the media server answered {method} with {answer.status} {reason}")

    def _accept_challenge(self, answer: Response) -> None:
        try:
            super()._accept_challenge(answer)
        except RtspError:
            raise PublishError(
                "the media server asks for an authentication scheme the agent lacks"
            ) from None

    async def _ping(self, method: str) -> None:
        """Any answer keeps the session (some servers refuse the method and still count it);
        none in time, or a closed connection, ends it."""
        await self._exchange(method, self.url, {}, b"")

    def _keep_alive_failed(self, error: Exception) -> None:
        self.abort(str(error))

    # -- bounded writes -------------------------------------------------------------------------

    def _bound_socket(self) -> bool:
        """A fixed kernel send buffer (autotuning would let it hold megabytes more than
        ``max_queued_bytes``) and ``TCP_USER_TIMEOUT``; False if the kernel lacks the latter."""
        sock = self._transport.get_extra_info("socket") if self._transport else None
        if sock is None:
            return False
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer_bytes)
        if not hasattr(socket, "TCP_USER_TIMEOUT"):
            return False
        try:
            sock.setsockopt(
                socket.IPPROTO_TCP,
                socket.TCP_USER_TIMEOUT,
                max(1, round(self.write_timeout_s * 1000)),
            )
        except OSError:
            return False
        return True

    def _sent_bytes(self) -> int:
        assert self._transport is not None
        return self.written_bytes - self._transport.get_write_buffer_size()

    def _watch_progress(self) -> None:
        assert self._loop is not None
        self._sent_at_check = self._sent_bytes()
        self._progress_at = self._loop.time()
        self._stall_check = self._loop.call_later(self.write_timeout_s / 4, self._check_progress)

    def _check_progress(self) -> None:
        """While bytes wait in the buffer: some must leave within ``write_timeout_s``."""
        assert self._loop is not None and self._transport is not None
        self._stall_check = None
        if self._transport.is_closing() or not self._transport.get_write_buffer_size():
            return
        now, sent = self._loop.time(), self._sent_bytes()
        if sent > self._sent_at_check:
            self._sent_at_check, self._progress_at = sent, now
        elif now - self._progress_at >= self.write_timeout_s:
            self.abort(f"the media server took nothing for {round(now - self._progress_at)} s")
            return
        self._stall_check = self._loop.call_later(self.write_timeout_s / 4, self._check_progress)

    def _stop_timers(self) -> None:
        if self._keepalive is not None and self._keepalive is not asyncio.current_task():
            self._keepalive.cancel()
        if self._stall_check is not None:
            self._stall_check.cancel()
            self._stall_check = None

    # -- asyncio.Protocol -----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        try:
            self._framer.feed(data)
        except RtspError:
            self.abort("the media server sent bytes that are not RTSP")

    def pause_writing(self) -> None:
        self.congested = True

    def resume_writing(self) -> None:
        self.congested = False

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timers()
        if exc is not None and isinstance(exc, OSError) and exc.strerror:
            self._end(f"the connection to the media server failed ({exc.strerror})")
        else:
            self._end("the media server closed the connection")

    def _end(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
        error = self.error
        self._fail_pending(lambda: PublishError(error))
        self.recording = False
        self.ended.set()
