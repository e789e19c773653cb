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
from collections import deque

from tunnel_agent.rtsp.auth import Credentials
from tunnel_agent.rtsp.errors import RtspError
from tunnel_agent.rtsp.messages import Framer, Response, build_request, parse_session

DEFAULT_SESSION_TIMEOUT_S = 60.0
MIN_KEEPALIVE_S = 1.0
TEARDOWN_WAIT_S = 1.0
MAX_REASON_CHARS = 80
TRACK_CONTROL = "streamid=0"


class PublishError(Exception):
    """The media server refused or lost the session; ``str(error)`` says why, without secrets."""


class RtspPublisher(asyncio.Protocol):
    """One RECORD session: ``connect``, ``record`` with an SDP, ``send`` batches, ``close``."""

    def __init__(
        self,
        url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        request_timeout_s: float = 10.0,
        write_timeout_s: float = 10.0,
        max_queued_bytes: int = 1 << 20,
        send_buffer_bytes: int = 256 * 1024,
        user_agent: str = "tunnel-agent",
    ) -> None:
        self.url = url  # without credentials
        self.request_timeout_s = request_timeout_s
        self.write_timeout_s = write_timeout_s
        self.max_queued_bytes = max_queued_bytes
        self.send_buffer_bytes = send_buffer_bytes
        self.user_agent = user_agent
        self._credentials = Credentials(username, password or "") if username else None
        self._framer = Framer(lambda _channel, _packet: None, self._response)  # RTCP: unused
        self._transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cseq = 0
        self._pending: deque[tuple[int, asyncio.Future[Response]]] = deque()
        self._session: str | None = None
        self._session_timeout_s = DEFAULT_SESSION_TIMEOUT_S
        self._methods: set[str] = set()
        self._keepalive: asyncio.Task[None] | None = None
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
        try:
            async with asyncio.timeout(self.request_timeout_s):
                await loop.create_connection(
                    lambda: self,
                    host,
                    port,
                    ssl=ssl_context,
                    server_hostname=host if ssl_context is not None else None,
                    ssl_handshake_timeout=self.request_timeout_s if ssl_context else None,
                )
        except TimeoutError:
            raise PublishError("the media server did not answer in time") from None
        except ssl.SSLCertVerificationError as exc:
            reason = exc.verify_message or "certificate verify failed"
            raise PublishError(f"the media server's certificate is untrusted ({reason})") from None
        except ssl.SSLError as exc:
            raise PublishError(f"TLS with the media server failed ({exc.reason})") from None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise PublishError(f"the media server could not be reached ({reason})") from None
        assert self._transport is not None
        self._transport.set_write_buffer_limits(self.max_queued_bytes, self.max_queued_bytes // 4)
        self.write_bounded = self._bound_socket()

    async def record(self, sdp: str) -> None:
        """OPTIONS, ANNOUNCE ``sdp``, SETUP its one track, RECORD; then keep the session alive."""
        options = await self.request("OPTIONS", self.url)
        public = options.header("public") or ""
        self._methods = {m.strip().upper() for m in public.split(",") if m.strip()}
        await self.request("ANNOUNCE", self.url, {"Content-Type": "application/sdp"}, sdp.encode())
        track = f"{self.url.rstrip('/')}/{TRACK_CONTROL}"
        answer = await self.request(
            "SETUP", track, {"Transport": "RTP/AVP/TCP;unicast;interleaved=0-1;mode=record"}
        )
        session, timeout_s = parse_session(answer.header("session"))
        if session is None:
            raise PublishError("the media server's SETUP answer has no session")
        self._session = session
        if timeout_s:
            self._session_timeout_s = timeout_s
        await self.request("RECORD", self.url, {"Range": "npt=0.000-"})
        self.recording = True
        assert self._loop is not None
        self._keepalive = self._loop.create_task(self._keep_alive())

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
        transport = self._transport
        if transport is not None and not transport.is_closing() and self._session is not None:
            with contextlib.suppress(PublishError, TimeoutError):
                async with asyncio.timeout(TEARDOWN_WAIT_S):
                    await self.request("TEARDOWN", self.url)
        self.abort("the session was closed")

    def abort(self, reason: str) -> None:
        """End the session at once (from the loop): pending requests fail with ``reason``."""
        self._stop_timers()
        self._end(reason)
        if self._transport is not None:
            self._transport.abort()

    # -- requests -------------------------------------------------------------------------------

    async def request(
        self, method: str, url: str, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> Response:
        """One request and its answer (after answering an authentication challenge, once)."""
        answer = await self._exchange(method, url, headers or {}, body)
        if answer.status == 401 and self._credentials is not None:
            try:
                self._credentials.accept(answer.headers.get("www-authenticate", []))
            except RtspError:
                raise PublishError(
                    "the media server asks for an authentication scheme the agent lacks"
                ) from None
            answer = await self._exchange(method, url, headers or {}, body)
        if 200 <= answer.status < 300:
            return answer
        if answer.status == 401:
            if self._credentials is None:
                raise PublishError("the media server asks for credentials and none were given")
            raise PublishError("the media server refused the credentials")
        reason = answer.reason[:MAX_REASON_CHARS]
        raise PublishError(f"the media server answered {method} with {answer.status} {reason}")

    async def _exchange(
        self, method: str, url: str, headers: dict[str, str], body: bytes
    ) -> Response:
        transport = self._transport
        if transport is None or transport.is_closing() or self._loop is None:
            raise PublishError(self.error or "the connection to the media server is closed")
        self._cseq += 1
        all_headers = {"User-Agent": self.user_agent, **headers}
        if self._session is not None:
            all_headers["Session"] = self._session
        if self._credentials is not None and self._credentials.ready:
            all_headers["Authorization"] = self._credentials.authorization(method, url)
        if body:
            all_headers["Content-Length"] = str(len(body))
        future: asyncio.Future[Response] = self._loop.create_future()
        self._pending.append((self._cseq, future))
        transport.write(build_request(method, url, self._cseq, all_headers) + body)
        try:
            async with asyncio.timeout(self.request_timeout_s):
                return await future
        except TimeoutError:
            raise PublishError(f"the media server did not answer {method} in time") from None

    async def _keep_alive(self) -> None:
        """Any answer keeps the session (some servers refuse the method and still count it);
        none in time, or a closed connection, ends it."""
        interval_s = max(self._session_timeout_s / 2, MIN_KEEPALIVE_S)
        method = "GET_PARAMETER" if "GET_PARAMETER" in self._methods else "OPTIONS"
        try:
            while True:
                await asyncio.sleep(interval_s)
                await self._exchange(method, self.url, {}, b"")
        except PublishError as exc:
            self.abort(str(exc))

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

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self._framer.feed(data)
        except RtspError:
            self.abort("the media server sent bytes that are not RTSP")

    def eof_received(self) -> bool | None:
        return None

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

    def _response(self, response: Response) -> None:
        cseq = response.header("cseq")
        while self._pending:
            sent, future = self._pending.popleft()
            if cseq is not None and cseq.strip() != str(sent):
                continue  # an answer that never came (its request timed out): skip it
            if not future.done():
                future.set_result(response)
            return

    def _end(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
        for _, future in self._pending:
            if not future.done():
                future.set_exception(PublishError(self.error))
        self._pending.clear()
        self.recording = False
        self.ended.set()
