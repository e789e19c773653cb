"""An asyncio RTSP client over one TCP connection, media interleaved in it (RFC 2326 10.12).

It runs on the caller's event loop: the socket's bytes arrive in ``data_received`` in whatever
chunks TCP delivers (often tens of kilobytes, dozens of RTP packets), and ``messages.Framer``
hands each packet to its stream's receiver (a depacketiser) as a slice of that chunk. Every wait
has a deadline: connecting and each answer ``request_timeout_s``, media ``read_timeout_s`` (a
camera that stops sending is noticed). The session is kept alive with GET_PARAMETER (or OPTIONS,
if the camera lacks it) at half its timeout, and TEARDOWN is sent on close. Credentials go only
in ``Authorization`` headers after the camera asks for them; no error names them.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections import deque
from typing import Protocol

from tunnel_agent.rtsp.auth import Credentials
from tunnel_agent.rtsp.errors import (
    RtspAuthFailed,
    RtspConnectionLost,
    RtspError,
    RtspNotFound,
    RtspProtocolError,
    RtspTimeout,
)
from tunnel_agent.rtsp.messages import (
    Framer,
    Response,
    build_request,
    parse_rtp_info,
    parse_session,
)
from tunnel_agent.rtsp.sdp import MediaDescription, SessionDescription, control_url, parse_sdp

DEFAULT_SESSION_TIMEOUT_S = 60.0
MIN_KEEPALIVE_S = 1.0
TEARDOWN_WAIT_S = 1.0
MAX_REASON_CHARS = 80
_INTERLEAVED = re.compile(r"interleaved=(\d+)(?:-(\d+))?", re.IGNORECASE)


class RtpReceiver(Protocol):
    """Where one stream's RTP packets go (the depacketisers are such receivers)."""

    def push(self, packet: memoryview) -> None: ...

    def set_reference(self, rtptime: int) -> None: ...


class RtspClient(asyncio.Protocol):
    """One RTSP session: ``connect``, ``describe``, ``setup`` each stream, ``play``, then
    ``wait`` until the stream ends (it raises why), and ``close``."""

    def __init__(
        self,
        url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        request_timeout_s: float = 10.0,
        read_timeout_s: float = 10.0,
        user_agent: str = "tunnel-agent",
        read_interval_s: float = 0.0,
    ) -> None:
        self.url = url
        self.base_url = url
        self.request_timeout_s = request_timeout_s
        self.read_timeout_s = read_timeout_s
        self.user_agent = user_agent
        # Above 0, reading pauses this long after each chunk: the kernel gathers the camera's
        # packets meanwhile and one read takes them all (a few reads a second, not one a packet).
        self.read_interval_s = read_interval_s
        self._credentials = Credentials(username, password or "") if username else None
        self._framer = Framer(self._packet, self._response)
        self._transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cseq = 0
        self._pending: deque[tuple[int, str, asyncio.Future[Response]]] = deque()
        self._receivers: dict[int, RtpReceiver] = {}
        self._streams: list[tuple[str, RtpReceiver]] = []  # (SETUP URL, receiver)
        self._session: str | None = None
        self._session_timeout_s = DEFAULT_SESSION_TIMEOUT_S
        self._methods: set[str] = set()
        self._ended: asyncio.Future[None] | None = None
        self._last_data = 0.0
        self._watchdog: asyncio.TimerHandle | None = None
        self._keepalive: asyncio.Task[None] | None = None
        self.playing = False

    # -- the steps ------------------------------------------------------------------------------

    async def connect(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        """Over TCP to ``host:port``, in TLS with ``tls`` (RTSPS; the name checked is ``host``)."""
        loop = self.prepare()
        try:
            async with asyncio.timeout(self.request_timeout_s):
                await loop.create_connection(
                    lambda: self, host, port, ssl=tls, server_hostname=host if tls else None
                )
        except TimeoutError:
            raise RtspTimeout("the camera did not answer in time") from None
        except ssl.SSLError as exc:
            reason = getattr(exc, "reason", None) or type(exc).__name__
            raise RtspConnectionLost(f"the camera's TLS was refused ({reason})") from None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise RtspConnectionLost(f"the camera could not be reached ({reason})") from None

    def prepare(self) -> asyncio.AbstractEventLoop:
        """Ready to be connected: ``connect`` calls it, and so does a caller that joins this
        protocol to a transport of its own (``connection_made``), such as an in-process tunnel."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._ended = loop.create_future()
        return loop

    async def describe(self) -> SessionDescription:
        options = await self.request("OPTIONS", self.url)
        public = options.header("public") or ""
        self._methods = {m.strip().upper() for m in public.split(",") if m.strip()}
        answer = await self.request("DESCRIBE", self.url, {"Accept": "application/sdp"})
        base = answer.header("content-base") or answer.header("content-location")
        self.base_url = base or self.url
        try:
            text = answer.body.decode("utf-8")
        except UnicodeDecodeError:
            text = answer.body.decode("latin-1")
        return parse_sdp(text)

    async def setup(self, media: MediaDescription, receiver: RtpReceiver) -> None:
        """Ask for ``media`` interleaved on the next free pair of channels."""
        channel = 2 * len(self._streams)
        url = control_url(self.base_url, media.control)
        headers = {"Transport": f"RTP/AVP/TCP;unicast;interleaved={channel}-{channel + 1}"}
        answer = await self.request("SETUP", url, headers)
        found = _INTERLEAVED.search(answer.header("transport") or "")
        if found is None:
            raise RtspProtocolError("the camera does not send this stream over the RTSP connection")
        self._receivers[int(found.group(1))] = receiver
        self._streams.append((url, receiver))
        session, timeout_s = parse_session(answer.header("session"))
        if session is None:
            raise RtspProtocolError("the camera's SETUP answer has no session")
        self._session = session
        if timeout_s:
            self._session_timeout_s = timeout_s

    async def play(self) -> None:
        # RTP-Info is applied in ``_response``, before any packet that follows the answer.
        await self.request("PLAY", self.base_url, {"Range": "npt=0.000-"})
        loop = asyncio.get_running_loop()
        self._last_data = loop.time()
        self._watchdog = loop.call_later(self.read_timeout_s / 2, self._check_reads)
        self._keepalive = loop.create_task(self._keep_alive())

    async def wait(self) -> None:
        """Until the stream ends: raises ``RtspError`` with the reason (or what a receiver
        raised)."""
        assert self._ended is not None
        await asyncio.shield(self._ended)

    async def close(self) -> None:
        """TEARDOWN (briefly waited for), then close the connection."""
        if self._keepalive is not None:
            self._keepalive.cancel()
        if self._watchdog is not None:
            self._watchdog.cancel()
        transport = self._transport
        if transport is not None and not transport.is_closing() and self._session is not None:
            with contextlib.suppress(RtspError, TimeoutError):
                async with asyncio.timeout(TEARDOWN_WAIT_S):
                    await self.request("TEARDOWN", self.base_url)
        self._end(RtspConnectionLost("the RTSP session was closed"))
        if transport is not None:
            transport.close()

    def fail(self, error: RtspError) -> None:
        """End the session now with ``error`` (what ``wait`` raises), e.g. a caller's watchdog."""
        self._end(error)
        if self._transport is not None:
            self._transport.close()

    # -- requests -------------------------------------------------------------------------------

    async def request(
        self, method: str, url: str, headers: dict[str, str] | None = None
    ) -> Response:
        """One request and its answer (after answering an authentication challenge, once)."""
        answer = await self._exchange(method, url, headers or {})
        if answer.status == 401 and self._credentials is not None:
            self._credentials.accept(answer.headers.get("www-authenticate", []))
            answer = await self._exchange(method, url, headers or {})
        if 200 <= answer.status < 300:
            return answer
        if answer.status == 401:
            if self._credentials is None:
                raise RtspAuthFailed("the camera asks for credentials and none were given")
            raise RtspAuthFailed("the camera refused the credentials")
        if answer.status == 404:
            raise RtspNotFound("the camera has no stream at this path")
        reason = answer.reason[:MAX_REASON_CHARS]
        raise RtspError(f"the camera answered {method} with {answer.status} {reason}".rstrip())

    async def _exchange(self, method: str, url: str, headers: dict[str, str]) -> Response:
        transport = self._transport
        if transport is None or transport.is_closing() or self._loop is None:
            raise RtspConnectionLost("the connection to the camera is closed")
        self._cseq += 1
        all_headers = {"User-Agent": self.user_agent, **headers}
        if self._session is not None:
            all_headers["Session"] = self._session
        if self._credentials is not None and self._credentials.ready:
            all_headers["Authorization"] = self._credentials.authorization(method, url)
        future: asyncio.Future[Response] = self._loop.create_future()
        self._pending.append((self._cseq, method, future))
        transport.write(build_request(method, url, self._cseq, all_headers))
        try:
            async with asyncio.timeout(self.request_timeout_s):
                return await future
        except TimeoutError:
            raise RtspTimeout(f"the camera did not answer {method} in time") from None

    async def _keep_alive(self) -> None:
        interval_s = max(self._session_timeout_s / 2, MIN_KEEPALIVE_S)
        method = "GET_PARAMETER" if "GET_PARAMETER" in self._methods else "OPTIONS"
        try:
            while True:
                await asyncio.sleep(interval_s)
                await self.request(method, self.base_url)
        except RtspError as exc:
            self._end(exc)

    def _check_reads(self) -> None:
        assert self._loop is not None
        silent_s = self._loop.time() - self._last_data
        if silent_s >= self.read_timeout_s:
            self._end(RtspTimeout(f"the camera sent nothing for {round(silent_s)} s"))
            if self._transport is not None:
                self._transport.close()
            return
        self._watchdog = self._loop.call_later(self.read_timeout_s / 2, self._check_reads)

    # -- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        assert self._loop is not None and self._transport is not None
        self._last_data = self._loop.time()
        try:
            self._framer.feed(data)
        except Exception as exc:  # the framer's, or a receiver's: the session cannot go on
            self._end(exc)
            self._transport.close()
            return
        if self.read_interval_s > 0 and not self._transport.is_closing():
            self._transport.pause_reading()
            self._loop.call_later(self.read_interval_s, self._resume_reading)

    def _resume_reading(self) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(RtspConnectionLost("the camera closed the connection"))

    def _packet(self, channel: int, packet: memoryview) -> None:
        receiver = self._receivers.get(channel)
        if receiver is not None:  # odd channels carry RTCP: nothing here needs it
            receiver.push(packet)

    def _response(self, response: Response) -> None:
        cseq = response.header("cseq")
        while self._pending:
            sent, method, future = self._pending.popleft()
            if cseq is not None and cseq.strip() != str(sent):
                continue  # an answer that never came (its request timed out): skip it
            if method == "PLAY" and 200 <= response.status < 300:
                self._apply_rtp_info(response)
                self.playing = True
            if not future.done():
                future.set_result(response)
            return

    def _apply_rtp_info(self, response: Response) -> None:
        times = parse_rtp_info(response.header("rtp-info"))
        for url, receiver in self._streams:
            rtptime = times.get(url)
            if rtptime is None:  # some cameras name the stream by its control path only
                rtptime = next((t for u, t in times.items() if url.endswith(u)), None)
            if rtptime is not None:
                receiver.set_reference(rtptime)

    def _end(self, error: Exception) -> None:
        for _, _, future in self._pending:
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
        if self._ended is not None and not self._ended.done():
            self._ended.set_exception(error)
            self._ended.exception()  # retrieved: whoever waits gets it, no one must
