"""RTSP 1.0 on the wire (RFC 2326): requests out; answers and interleaved packets in. Pure code.

After PLAY the camera's bytes are mostly ``$``-framed RTP packets (10.12: a ``$``, a channel
byte, a 16-bit length) with an occasional answer between them. ``Framer.feed`` takes whatever
chunk the socket gave, hands each whole packet on as a slice of that chunk (no copy), and keeps
only an unfinished tail for the next chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tunnel_agent.rtsp.errors import RtspProtocolError

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 1024 * 1024
INTERLEAVED = 0x24  # "$"
_END_OF_HEADER = b"\r\n\r\n"


@dataclass
class Response:
    status: int
    reason: str
    headers: dict[str, list[str]] = field(default_factory=dict)  # names in lower case
    body: bytes = b""

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


def build_request(method: str, url: str, cseq: int, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {url} RTSP/1.0", f"CSeq: {cseq}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def parse_head(head: bytes) -> tuple[str, dict[str, list[str]]]:
    """The first line and the headers of a message (without its blank line)."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = head.decode("latin-1")
    first, *lines = text.split("\r\n")
    headers: dict[str, list[str]] = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if colon:
            headers.setdefault(name.strip().lower(), []).append(value.strip())
    return first, headers


def parse_session(value: str | None) -> tuple[str | None, float | None]:
    """(session id, timeout in seconds) from a ``Session`` header (``id;timeout=60``)."""
    if not value:
        return None, None
    session, *parameters = (p.strip() for p in value.split(";"))
    timeout_s = None
    for parameter in parameters:
        name, _, number = parameter.partition("=")
        if name.strip().lower() == "timeout":
            try:
                timeout_s = float(number)
            except ValueError:
                timeout_s = None
    return session or None, timeout_s


def parse_rtp_info(value: str | None) -> dict[str, int]:
    """``rtptime`` by stream URL from a PLAY answer's ``RTP-Info`` (the same instant for all)."""
    times: dict[str, int] = {}
    for stream in (value or "").split(","):
        url, rtptime = "", None
        for parameter in stream.split(";"):
            name, _, setting = parameter.strip().partition("=")
            if name.lower() == "url":
                url = setting
            elif name.lower() == "rtptime":
                try:
                    rtptime = int(setting)
                except ValueError:
                    rtptime = None
        if url and rtptime is not None:
            times[url] = rtptime
    return times


class Framer:
    """The camera's byte stream split into answers and interleaved packets."""

    def __init__(
        self,
        on_packet: Callable[[int, memoryview], None],
        on_response: Callable[[Response], None],
    ) -> None:
        self.on_packet = on_packet
        self.on_response = on_response
        self._tail = b""

    def feed(self, data: bytes) -> None:
        if self._tail:
            data = self._tail + data
            self._tail = b""
        view = memoryview(data)
        size = len(data)
        position = 0
        on_packet = self.on_packet
        while position < size:
            if data[position] == INTERLEAVED:
                if position + 4 > size:
                    break
                end = position + 4 + ((data[position + 2] << 8) | data[position + 3])
                if end > size:
                    break
                on_packet(data[position + 1], view[position + 4 : end])
                position = end
                continue
            used = self._message(data, position)
            if used == 0:
                break
            position += used
        if position < size:
            self._tail = data[position:]
            if len(self._tail) > MAX_HEADER_BYTES + MAX_BODY_BYTES:
                raise RtspProtocolError("the camera sent a message too large to be RTSP")

    def _message(self, data: bytes, start: int) -> int:
        """Bytes used by the message at ``start`` (0: not all there yet)."""
        end = data.find(_END_OF_HEADER, start, start + MAX_HEADER_BYTES)
        if end < 0:
            if len(data) - start >= MAX_HEADER_BYTES:
                raise RtspProtocolError("the camera sent an RTSP header too large")
            if not 0x41 <= data[start] <= 0x5A:  # answers and requests start with A-Z
                raise RtspProtocolError("the camera sent bytes that are not RTSP")
            return 0
        first, headers = parse_head(data[start:end])
        length_text = (headers.get("content-length") or ["0"])[0]
        try:
            length = int(length_text)
        except ValueError:
            raise RtspProtocolError("the camera sent a bad Content-Length") from None
        if not 0 <= length <= MAX_BODY_BYTES:
            raise RtspProtocolError("the camera sent an RTSP body too large")
        body_start = end + len(_END_OF_HEADER)
        if body_start + length > len(data):
            return 0
        if first.startswith("RTSP/"):
            parts = first.split(" ", 2)
            try:
                status = int(parts[1])
            except (IndexError, ValueError):
                raise RtspProtocolError("the camera sent a malformed status line") from None
            reason = parts[2] if len(parts) > 2 else ""
            body = data[body_start : body_start + length]
            self.on_response(Response(status, reason, headers, body))
        elif not first.endswith("RTSP/1.0"):
            raise RtspProtocolError("the camera sent bytes that are not RTSP")
        # else: a request from the camera (ANNOUNCE, SET_PARAMETER...): nothing asks for those
        return body_start + length - start
