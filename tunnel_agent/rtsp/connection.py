"""What the RTSP PLAY client and the RECORD publisher share: one TCP (or TLS) connection, its
requests and answers, the session, keep-alive and TEARDOWN.

Each side words its errors for its peer ("the camera ...", "the media server ...") and raises its
own exception types: ``peer`` names it, ``_failure`` picks the type for each kind of failure, and
the few messages that differ in more than the name are hooks. Interleaved data (RTP, RTCP) goes to
``_interleaved``, called by the framer for each packet. Every wait has a deadline: connecting and
each answer ``request_timeout_s``. Credentials go only in ``Authorization`` headers after the peer
asks for them; no error names them.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import Callable
from typing import ClassVar, Literal, TypedDict

from tunnel_agent.rtsp.auth import Credentials
from tunnel_agent.rtsp.messages import Framer, Response, build_request, parse_session

DEFAULT_SESSION_TIMEOUT_S = 60.0
MIN_KEEPALIVE_S = 1.0
TEARDOWN_WAIT_S = 1.0
MAX_REASON_CHARS = 80

Failure = Literal["timeout", "unreachable", "closed", "auth", "protocol"]


class ConnectionOptions(TypedDict, total=False):
    """The keyword arguments both sides take for their connection (defaults in
    ``RtspConnection``)."""

    username: str | None
    password: str | None
    request_timeout_s: float
    user_agent: str


class RtspConnection(asyncio.Protocol, metaclass=abc.ABCMeta):
    """One RTSP connection's request machinery; subclasses add the session's steps."""

    peer: ClassVar[str]  # who is at the other end, as every message names it
    error_type: ClassVar[type[Exception]]  # what every failure here is an instance of

    def __init_subclass__(cls, *, peer: str, error_type: type[Exception]) -> None:
        super().__init_subclass__()
        cls.peer = peer
        cls.error_type = error_type

    def __init__(
        self,
        url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        request_timeout_s: float = 10.0,
        user_agent: str = "tunnel-agent",
    ) -> None:
        self.url = url  # without credentials
        self.request_timeout_s = request_timeout_s
        self.user_agent = user_agent
        self._credentials = Credentials(username, password or "") if username else None
        self._framer = Framer(self._interleaved, self._response)
        self._transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cseq = 0
        self._pending: deque[tuple[int, str, asyncio.Future[Response]]] = deque()
        self._session: str | None = None
        self._session_timeout_s = DEFAULT_SESSION_TIMEOUT_S
        self._methods: set[str] = set()
        self._keepalive: asyncio.Task[None] | None = None

    # -- what each side words or does its own way ----------------------------------------------

    @abc.abstractmethod
    def _failure(self, kind: Failure, message: str) -> Exception:
        """The exception to raise for a failure of ``kind``, saying ``message``."""

    @abc.abstractmethod
    def _tls_failure(self, exc: ssl.SSLError) -> Exception:
        """The exception to raise when TLS with the peer fails."""

    @abc.abstractmethod
    def _answer_failure(self, method: str, answer: Response) -> Exception:
        """The exception to raise for a final answer outside 2xx (other than 401)."""

    def _session_url(self) -> str:
        """Where keep-alive and TEARDOWN go."""
        return self.url

    async def _ping(self, method: str) -> None:
        """One keep-alive request."""
        await self.request(method, self._session_url())

    @abc.abstractmethod
    def _keep_alive_failed(self, error: Exception) -> None:
        """Keep-alive failed with ``error``: the session ends."""

    def _interleaved(self, channel: int, packet: memoryview) -> None:
        """One packet of interleaved data on ``channel``."""

    def _answered(self, method: str, response: Response) -> None:
        """``response`` answers ``method``: called before its request returns."""

    def _accept_challenge(self, answer: Response) -> None:
        assert self._credentials is not None
        self._credentials.accept(answer.headers.get("www-authenticate", []))

    # -- connecting and the session ------------------------------------------------------------

    async def _open(
        self,
        loop: asyncio.AbstractEventLoop,
        host: str,
        port: int,
        tls: ssl.SSLContext | None,
        handshake_timeout_s: float | None = None,
    ) -> None:
        """TCP to ``host:port``, in TLS with ``tls`` (the name checked is ``host``), in time."""
        try:
            async with asyncio.timeout(self.request_timeout_s):
                await loop.create_connection(
                    lambda: self,
                    host,
                    port,
                    ssl=tls,
                    server_hostname=host if tls is not None else None,
                    ssl_handshake_timeout=handshake_timeout_s,
                )
        except TimeoutError:
            raise self._failure("timeout", f"{self.peer} did not answer in time") from None
        except ssl.SSLError as exc:
            raise self._tls_failure(exc) from None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            message = f"{self.peer} could not be reached ({reason})"
            raise self._failure("unreachable", message) from None

    async def _options(self, url: str) -> None:
        """OPTIONS: which methods the peer has (keep-alive prefers GET_PARAMETER)."""
        options = await self.request("OPTIONS", url)
        public = options.header("public") or ""
        self._methods = {m.strip().upper() for m in public.split(",") if m.strip()}

    def _take_session(self, answer: Response) -> None:
        """The session (and its timeout, if given) from a SETUP answer."""
        session, timeout_s = parse_session(answer.header("session"))
        if session is None:
            raise self._failure("protocol", f"{self.peer}'s SETUP answer has no session")
        self._session = session
        if timeout_s:
            self._session_timeout_s = timeout_s

    def _start_keep_alive(self, loop: asyncio.AbstractEventLoop) -> None:
        self._keepalive = loop.create_task(self._keep_alive())

    async def _keep_alive(self) -> None:
        interval_s = max(self._session_timeout_s / 2, MIN_KEEPALIVE_S)
        method = "GET_PARAMETER" if "GET_PARAMETER" in self._methods else "OPTIONS"
        try:
            while True:
                await asyncio.sleep(interval_s)
                await self._ping(method)
        except self.error_type as exc:
            self._keep_alive_failed(exc)

    async def _teardown(self) -> None:
        """TEARDOWN, briefly waited for, if there is a session and a connection to send it on."""
        transport = self._transport
        if transport is not None and not transport.is_closing() and self._session is not None:
            with contextlib.suppress(self.error_type, TimeoutError):
                async with asyncio.timeout(TEARDOWN_WAIT_S):
                    await self.request("TEARDOWN", self._session_url())

    # -- requests -------------------------------------------------------------------------------

    async def request(
        self, method: str, url: str, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> Response:
        """One request and its answer (after answering an authentication challenge, once)."""
        answer = await self._exchange(method, url, headers or {}, body)
        if answer.status == 401 and self._credentials is not None:
            self._accept_challenge(answer)
            answer = await self._exchange(method, url, headers or {}, body)
        if 200 <= answer.status < 300:
            return answer
        if answer.status == 401:
            if self._credentials is None:
                message = f"{self.peer} asks for credentials and none were given"
                raise self._failure("auth", message)
            raise self._failure("auth", f"{self.peer} refused the credentials")
        raise self._answer_failure(method, answer)

    async def _exchange(
        self, method: str, url: str, headers: dict[str, str], body: bytes = b""
    ) -> Response:
        transport = self._transport
        if transport is None or transport.is_closing() or self._loop is None:
            raise self._failure("closed", f"the connection to {self.peer} is closed")
        self._cseq += 1
        all_headers = {"User-Agent": self.user_agent, **headers}
        if self._session is not None:
            all_headers["Session"] = self._session
        if self._credentials is not None and self._credentials.ready:
            all_headers["Authorization"] = self._credentials.authorization(method, url)
        if body:
            all_headers["Content-Length"] = str(len(body))
        future: asyncio.Future[Response] = self._loop.create_future()
        self._pending.append((self._cseq, method, future))
        transport.write(build_request(method, url, self._cseq, all_headers) + body)
        try:
            async with asyncio.timeout(self.request_timeout_s):
                return await future
        except TimeoutError:
            raise self._failure("timeout", f"{self.peer} did not answer {method} in time") from None

    def _response(self, response: Response) -> None:
        cseq = response.header("cseq")
        while self._pending:
            sent, method, future = self._pending.popleft()
            if cseq is not None and cseq.strip() != str(sent):
                continue  # an answer that never came (its request timed out): skip it
            self._answered(method, response)
            if not future.done():
                future.set_result(response)
            return

    def _fail_pending(self, error: Callable[[], Exception]) -> None:
        """Every request still waiting fails with ``error()``."""
        for _, _, future in self._pending:
            if not future.done():
                future.set_exception(error())
        self._pending.clear()

    # -- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def eof_received(self) -> bool | None:
        return None
