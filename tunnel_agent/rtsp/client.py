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
import re
import ssl
from typing import Protocol, Unpack

from tunnel_agent.rtsp.connection import (
    MAX_REASON_CHARS,
    ConnectionOptions,
    Failure,
    RtspConnection,
)
from tunnel_agent.rtsp.errors import (
    RtspAuthFailed,
    RtspConnectionLost,
    RtspError,
    RtspNotFound,
    RtspProtocolError,
    RtspTimeout,
)
from tunnel_agent.rtsp.messages import Response, parse_rtp_info
from tunnel_agent.rtsp.sdp import MediaDescription, SessionDescription, control_url, parse_sdp

_INTERLEAVED = re.compile(r"interleaved=(\d+)(?:-(\d+))?", re.IGNORECASE)
_FAILURES: dict[Failure, type[RtspError]] = {
    "timeout": RtspTimeout,
    "unreachable": RtspConnectionLost,
    "closed": RtspConnectionLost,
    "auth": RtspAuthFailed,
    "protocol": RtspProtocolError,
}


class RtpReceiver(Protocol):
    """Where one stream's RTP packets go (the depacketisers are such receivers)."""

    def push(self, packet: memoryview) -> None: ...

    def set_reference(self, rtptime: int) -> None: ...


class RtspClient(RtspConnection, peer="the camera", error_type=RtspError):
    """One RTSP session: ``connect``, ``describe``, ``setup`` each stream, ``play``, then
    ``wait`` until the stream ends (it raises why), and ``close``."""

    def __init__(
        self,
        url: str,
        *,
        read_timeout_s: float = 10.0,
        read_interval_s: float = 0.0,
        **options: Unpack[ConnectionOptions],
    ) -> None:
        super().__init__(url, **options)
        self.base_url = url
        self.read_timeout_s = read_timeout_s
        # Above 0, reading pauses this long after each chunk: the kernel gathers the camera's
        # packets meanwhile and one read takes them all (a few reads a second, not one a packet).
        self.read_interval_s = read_interval_s
        self._receivers: dict[int, RtpReceiver] = {}
        self._streams: list[tuple[str, RtpReceiver]] = []  # (SETUP URL, receiver)
        self._ended: asyncio.Future[None] | None = None
        self._last_data = 0.0
        self._watchdog: asyncio.TimerHandle | None = None
        self.playing = False

    # -- the steps ------------------------------------------------------------------------------

    async def connect(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        """Over TCP to ``host:port``, in TLS with ``tls`` (RTSPS; the name checked is ``host``)."""
        await self._open(self.prepare(), host, port, tls)

    def prepare(self) -> asyncio.AbstractEventLoop:
        """Ready to be connected: ``connect`` calls it, and so does a caller that joins this
        protocol to a transport of its own (``connection_made``), such as an in-process tunnel."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._ended = loop.create_future()
        return loop

    async def describe(self) -> SessionDescription:
        await self._options(self.url)
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
        self._take_session(answer)

    async def play(self) -> None:
        # RTP-Info is applied in ``_answered``, before any packet that follows the answer.
        await self.request("PLAY", self.base_url, {"Range": "npt=0.000-"})
        loop = asyncio.get_running_loop()
        self._last_data = loop.time()
        self._watchdog = loop.call_later(self.read_timeout_s / 2, self._check_reads)
        self._start_keep_alive(loop)

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
        await self._teardown()
        self._end(RtspConnectionLost("the RTSP session was closed"))
        if transport is not None:
            transport.close()

    def fail(self, error: RtspError) -> None:
        """End the session now with ``error`` (what ``wait`` raises), e.g. a caller's watchdog."""
        self._end(error)
        if self._transport is not None:
            self._transport.close()

    # -- how the camera side words and ends things --------------------------------------------

    def _failure(self, kind: Failure, message: str) -> Exception:
        return _FAILURES[kind](message)

    def _tls_failure(self, exc: ssl.SSLError) -> Exception:
        reason = getattr(exc, "reason", None) or type(exc).__name__
        return RtspConnectionLost(f"the camera's TLS was refused ({reason})")

    def _answer_failure(self, method: str, answer: Response) -> Exception:
        if answer.status == 404:
            return RtspNotFound("the camera has no stream at this path")
        reason = answer.reason[:MAX_REASON_CHARS]
        return RtspError(f"the camera answered {method} with {answer.status} {reason}".rstrip())

    def _session_url(self) -> str:
        return self.base_url

    def _keep_alive_failed(self, error: Exception) -> None:
        self._end(error)

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

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(RtspConnectionLost("the camera closed the connection"))

    def _interleaved(self, channel: int, packet: memoryview) -> None:
        receiver = self._receivers.get(channel)
        if receiver is not None:  # odd channels carry RTCP: nothing here needs it
            receiver.push(packet)

    def _answered(self, method: str, response: Response) -> None:
        # RTP-Info applies before any packet that follows the answer.
        if method == "PLAY" and 200 <= response.status < 300:
            self._apply_rtp_info(response)
            self.playing = True

    def _apply_rtp_info(self, response: Response) -> None:
        times = parse_rtp_info(response.header("rtp-info"))
        for url, receiver in self._streams:
            rtptime = times.get(url)
            if rtptime is None:  # some cameras name the stream by its control path only
                rtptime = next((t for u, t in times.items() if url.endswith(u)), None)
            if rtptime is not None:
                receiver.set_reference(rtptime)

    def _end(self, error: Exception) -> None:
        self._fail_pending(lambda: error)
        if self._ended is not None and not self._ended.done():
            self._ended.set_exception(error)
            self._ended.exception()  # retrieved: whoever waits gets it, no one must
