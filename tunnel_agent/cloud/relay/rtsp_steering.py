"""Steering RTSP clients to interleaved TCP: a state machine fed with bytes, with no I/O in it.

Through a byte tunnel only RTSP over TCP works: RTP over UDP would have to reach the consumer
directly from the camera, which on a real network it cannot. ffmpeg, GStreamer and most NVRs ask
for UDP first and wait for packets that never come. The relay follows the requests flowing from
the consumer to the camera and answers a ``SETUP`` that offers only UDP (unicast or multicast)
itself with ``461 Unsupported Transport``; the client then asks again at once with
``RTP/AVP/TCP;interleaved=...`` (seen with ffmpeg and GStreamer, recordings in tests/data/rtsp).
A ``SETUP`` that offers UDP and TCP alternatives keeps only the TCP ones. Nothing else is
changed: the camera's own Basic or Digest authentication goes through untouched, since requests
are forwarded byte for byte and the answered ``SETUP`` never reaches the camera.

Why 461 and not rewriting the Transport header: a client that asked for UDP and got a TCP answer
refuses it (ffmpeg: "Nonmatching transport in server reply"); 461 is the standard way for a
server to say "not this transport", and clients handle it.

Answers the relay gives itself must reach the consumer in order, so camera answers are counted
too until the answer to ``PLAY`` has passed. From the ``PLAY`` request on, the consumer's bytes
pass untouched; from the answer to it on, so do the camera's: the machine says so with
``consumer_done`` and ``camera_done`` and the pump stops calling it (no cost per byte after that).
Anything that does not parse as RTSP makes the machine step aside for good, rather than break a
stream it does not understand.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass

UNSUPPORTED_TRANSPORT = b"461 Unsupported Transport"
MAX_HEAD_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024
_INTERLEAVED_HEADER_BYTES = 4
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_REQUEST_LINE = re.compile(rb"^([A-Z_]{3,32}) (\S+) (RTSP/\d\.\d)$")
_STATUS_LINE = re.compile(rb"^RTSP/\d\.\d (\d{3})")
_SUCCESS_MIN, _SUCCESS_MAX = 200, 299


@dataclass(frozen=True)
class Steered:
    """What to do with a piece of the consumer's stream: send on, and answer directly."""

    to_camera: bytes = b""
    to_consumer: bytes = b""


@dataclass(frozen=True)
class _CameraAnswer:
    """An answer the camera owes for a forwarded request."""

    to_play: bool


@dataclass(frozen=True)
class _LocalAnswer:
    """An answer the relay gives, held until the camera's earlier answers have passed."""

    data: bytes


@dataclass(frozen=True)
class _Message:
    start_line: bytes
    headers: list[tuple[bytes, bytes]]
    head_end: int  # offset of the first body byte
    total: int  # head and body


class RtspSteering:
    """Follows one RTSP connection from both sides until ``PLAY``; see the module docstring."""

    def __init__(self) -> None:
        self._from_consumer = bytearray()
        self._from_camera = bytearray()
        self._expected: deque[_CameraAnswer | _LocalAnswer] = deque()
        self.consumer_done = False
        self.camera_done = False
        self.stepped_aside = False
        self.setups_refused = 0
        self.setups_rewritten = 0

    # -- consumer -> camera -------------------------------------------------------------------

    def from_consumer(self, data: bytes) -> Steered:
        if self.consumer_done:
            return Steered(to_camera=data)
        buffer = self._from_consumer
        buffer += data
        to_camera = bytearray()
        to_consumer = bytearray()
        while buffer and not self.consumer_done:
            if buffer[0] == 0x24:  # '$': an interleaved packet (RTCP) before PLAY
                size = _interleaved_size(buffer)
                if size is None or len(buffer) < size:
                    break
                to_camera += buffer[:size]
                del buffer[:size]
                continue
            message = _parse(buffer, _REQUEST_LINE)
            if message is None:
                if _undecidable(buffer, _REQUEST_LINE):
                    self._step_aside()
                    to_camera += buffer
                    buffer.clear()
                break
            if len(buffer) < message.total:
                break
            raw = bytes(buffer[: message.total])
            del buffer[: message.total]
            match = _REQUEST_LINE.match(message.start_line)
            assert match is not None
            method, version = match.group(1), match.group(3)
            if method == b"SETUP":
                offered = _transports(message.headers)
                tcp = [spec for spec in offered if _is_tcp(spec)]
                if offered and not tcp:
                    self.setups_refused += 1
                    answer = _answer(version, UNSUPPORTED_TRANSPORT, _header(message.headers))
                    to_consumer += self._answer_locally(answer)
                    continue
                if len(tcp) < len(offered):
                    self.setups_rewritten += 1
                    raw = _with_transport(raw, message, b",".join(tcp))
            self._expected.append(_CameraAnswer(to_play=method == b"PLAY"))
            to_camera += raw
            if method == b"PLAY":
                self.consumer_done = True
                to_camera += buffer
                buffer.clear()
        return Steered(bytes(to_camera), bytes(to_consumer))

    def _answer_locally(self, answer: bytes) -> bytes:
        if not self._expected:
            return answer
        self._expected.append(_LocalAnswer(answer))
        return b""

    def _step_aside(self) -> None:
        self.stepped_aside = True
        self.consumer_done = True
        if not any(isinstance(e, _LocalAnswer) for e in self._expected):
            self.camera_done = True

    # -- camera -> consumer -------------------------------------------------------------------

    def from_camera(self, data: bytes) -> bytes:
        if self.camera_done:
            return data
        buffer = self._from_camera
        buffer += data
        out = bytearray()
        while buffer and not self.camera_done:
            if buffer[0] == 0x24:
                size = _interleaved_size(buffer)
                if size is None or len(buffer) < size:
                    break
                out += buffer[:size]
                del buffer[:size]
                continue
            message = _parse(buffer, _STATUS_LINE) or _parse(buffer, _REQUEST_LINE)
            if message is None:
                if _undecidable(buffer, _STATUS_LINE) and _undecidable(buffer, _REQUEST_LINE):
                    out += self._release_all()
                    self.stepped_aside = self.camera_done = True
                    out += buffer
                    buffer.clear()
                break
            if len(buffer) < message.total:
                break
            out += buffer[: message.total]
            del buffer[: message.total]
            if _STATUS_LINE.match(message.start_line) is None:
                continue  # a request from the camera (e.g. GET_PARAMETER): owes nothing
            answered = self._expected.popleft() if self._expected else None
            out += self._release_local()
            play_answered = isinstance(answered, _CameraAnswer) and answered.to_play
            if (play_answered or self.stepped_aside) and not self._expected:
                self.camera_done = True
                out += buffer
                buffer.clear()
        return bytes(out)

    def _release_local(self) -> bytes:
        released = bytearray()
        while self._expected:
            first = self._expected[0]
            if not isinstance(first, _LocalAnswer):
                break
            released += first.data
            self._expected.popleft()
        return bytes(released)

    def _release_all(self) -> bytes:
        released = b"".join(e.data for e in self._expected if isinstance(e, _LocalAnswer))
        self._expected.clear()
        return released


def _interleaved_size(buffer: bytearray) -> int | None:
    if len(buffer) < _INTERLEAVED_HEADER_BYTES:
        return None
    return _INTERLEAVED_HEADER_BYTES + int.from_bytes(buffer[2:4], "big")


def _parse(buffer: bytearray, start: re.Pattern[bytes]) -> _Message | None:
    """The message at the start of ``buffer`` once its head is complete; None before that."""
    end = _HEAD_END.search(buffer, 0, MAX_HEAD_BYTES + 4)
    if end is None:
        return None
    lines = bytes(buffer[: end.start()]).split(b"\n")
    start_line = lines[0].rstrip(b"\r")
    if start.match(start_line) is None:
        return None
    headers = []
    for line in lines[1:]:
        name, sep, value = line.rstrip(b"\r").partition(b":")
        if not sep:
            return None
        headers.append((name.strip().lower(), value.strip()))
    length_text = _header(headers, b"content-length") or b"0"
    if not length_text.isdigit() or int(length_text) > MAX_BODY_BYTES:
        return None
    return _Message(start_line, headers, end.end(), end.end() + int(length_text))


def _undecidable(buffer: bytearray, start: re.Pattern[bytes]) -> bool:
    """True when ``buffer`` cannot become a message of this kind (so steering must give up)."""
    first_line_end = buffer.find(b"\n")
    if first_line_end >= 0:
        line = bytes(buffer[:first_line_end]).rstrip(b"\r")
        if start.match(line) is None:
            return True
        return _HEAD_END.search(buffer, 0, MAX_HEAD_BYTES + 4) is not None or len(buffer) > (
            MAX_HEAD_BYTES
        )
    return len(buffer) > 256  # a first line longer than any RTSP request line


def _header(headers: list[tuple[bytes, bytes]], name: bytes = b"cseq") -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def _transports(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    """The Transport header's alternatives, split on commas outside quotes."""
    value = _header(headers, b"transport")
    if not value:
        return []
    specs, current, quoted = [], bytearray(), False
    for byte in value:
        if byte == 0x22:  # '"'
            quoted = not quoted
        if byte == 0x2C and not quoted:  # ','
            specs.append(bytes(current).strip())
            current.clear()
        else:
            current.append(byte)
    specs.append(bytes(current).strip())
    return [s for s in specs if s]


def _is_tcp(spec: bytes) -> bool:
    """``RTP/AVP/TCP;...`` or any spec with ``interleaved=``; ``RTP/AVP`` alone means UDP."""
    parts = [p.strip().lower() for p in spec.split(b";")]
    protocol = parts[0].split(b"/")
    return (len(protocol) >= 3 and protocol[2] == b"tcp") or any(
        p.startswith(b"interleaved=") for p in parts[1:]
    )


def _with_transport(raw: bytes, message: _Message, value: bytes) -> bytes:
    head, body = raw[: message.head_end], raw[message.head_end :]
    lines = head.split(b"\n")
    for index, line in enumerate(lines):
        name, sep, _ = line.partition(b":")
        if sep and name.strip().lower() == b"transport":
            ending = b"\r" if line.endswith(b"\r") else b""
            lines[index] = name + b": " + value + ending
            break
    return b"\n".join(lines) + body


def _answer(version: bytes, status: bytes, cseq: bytes | None) -> bytes:
    lines = [version + b" " + status]
    if cseq is not None:
        lines.append(b"CSeq: " + cseq)
    return b"\r\n".join(lines) + b"\r\n\r\n"
