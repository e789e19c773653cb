"""What the agent and its re-stream publisher process say to each other, as bytes.

Agent to publisher (the publisher's stdin): frames of one kind byte, a 4-byte big-endian length
and the payload: an OPEN (JSON: URL, FFmpeg options, write timeout), then a TEMPLATE (a small
Matroska file that carries the stream's codec parameters), then PACKETs. End of input closes the
session. Publisher to agent (its stdout): one JSON object per line, ``{"connected": ...}`` once
the server has accepted the session, ``{"error": ...}`` before it exits on a failure.
"""

from __future__ import annotations

import io
import json
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

import av

from tunnel_agent.media.packets import MediaPacket, StreamTemplate

OPEN = b"O"
TEMPLATE = b"T"
PACKET = b"P"
_FRAME = struct.Struct(">cI")
_PACKET = struct.Struct(">qqiiB")  # pts (NO_PTS if none), dts, time base num/den, keyframe
NO_PTS = -(2**63)


@dataclass(frozen=True, slots=True)
class OpenRequest:
    url: str
    options: dict[str, str]
    write_timeout_s: float
    server_port: int


def frame(kind: bytes, payload: bytes) -> bytes:
    return _FRAME.pack(kind, len(payload)) + payload


def open_frame(request: OpenRequest) -> bytes:
    document = {
        "url": request.url,
        "options": request.options,
        "write_timeout_s": request.write_timeout_s,
        "server_port": request.server_port,
    }
    return frame(OPEN, json.dumps(document).encode())


def template_frame(template: StreamTemplate, first: MediaPacket) -> bytes:
    """The stream's codec parameters as a Matroska file with the session's first packet.

    Without a packet FFmpeg cannot open the file again (it reads one to find the stream's info).
    """
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="matroska") as holder:
        stream = holder.add_stream_from_template(template.stream)
        holder.mux(first.to_av(stream, first.dts))
    return frame(TEMPLATE, buffer.getvalue())


def packet_frame(packet: MediaPacket, offset: int) -> bytes:
    pts = packet.pts - offset if packet.pts is not None else NO_PTS
    head = _PACKET.pack(
        pts,
        packet.dts - offset,
        packet.time_base.numerator,
        packet.time_base.denominator,
        packet.is_keyframe,
    )
    return frame(PACKET, head + packet.data)


def read_frame(stream: BinaryIO) -> tuple[bytes, bytes] | None:
    """The next (kind, payload), or None at the end of input (also in the middle of a frame)."""
    head = stream.read(_FRAME.size)
    if len(head) < _FRAME.size:
        return None
    kind, size = _FRAME.unpack(head)
    payload = stream.read(size)
    if len(payload) < size:
        return None
    return kind, payload


def parse_open(payload: bytes) -> OpenRequest:
    document: dict[str, Any] = json.loads(payload)
    return OpenRequest(
        url=str(document["url"]),
        options={str(k): str(v) for k, v in document["options"].items()},
        write_timeout_s=float(document["write_timeout_s"]),
        server_port=int(document["server_port"]),
    )


def parse_packet(payload: bytes) -> tuple[int | None, int, int, int, bool, bytes]:
    """(pts, dts, time base numerator, denominator, keyframe, data) of a PACKET payload."""
    pts, dts, num, den, keyframe = _PACKET.unpack_from(payload)
    return (
        None if pts == NO_PTS else pts,
        dts,
        num,
        den,
        bool(keyframe),
        payload[_PACKET.size :],
    )
