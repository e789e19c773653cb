"""Access units into RTP: H.264 (RFC 6184) and H.265 (RFC 7798), framed for an RTSP connection.

Pure code, the publishing side's counterpart of ``depacketize``. A packetiser turns one access unit
(its NAL units, without start codes or length prefixes) into RTP packets, each already framed as
interleaved data (RFC 2326 10.12: ``$``, channel, 16-bit length): a unit that fits goes whole
(single NAL unit packet), a larger one in fragments (FU-A, FU); the last packet of an access unit
carries the marker bit. Packets are appended to a list as a small header and a slice of the unit,
so a whole batch becomes one ``b"".join`` and one socket write: no copy per packet, no write per
packet.

``VideoFormat`` reads what the SDP needs from a stream's extradata (``avcC``/``hvcC`` or Annex B)
and says how its packets are laid out; ``media_description`` writes the SDP's media section.
"""

from __future__ import annotations

import base64
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from tunnel_agent.rtsp.depacketize import (
    H264_FU_A,
    H264_PPS,
    H264_SPS,
    H265_FU,
    H265_PPS,
    H265_SPS,
    H265_VPS,
)

# An RTP packet (header included) that fits an Ethernet MTU with IP and UDP headers to spare, as a
# media server forwarding these packets to its UDP readers needs (FFmpeg's default is 1472).
MAX_RTP_PACKET_BYTES = 1400
RTP_HEADER_BYTES = 12
CLOCK_RATE_HZ = 90_000
DYNAMIC_PAYLOAD_TYPE = 96
_START_CODE = b"\x00\x00\x01"
# Interleaved frame ($, channel, length) + RTP header (V=2, M|PT, sequence, timestamp, SSRC).
_SINGLE = struct.Struct(">BBHBBHII")
_FU_H264 = struct.Struct(">BBHBBHIIBB")  # + FU indicator, FU header
_FU_H265 = struct.Struct(">BBHBBHIIBBB")  # + payload header (2 bytes), FU header
INTERLEAVED = 0x24
RTP_V2 = 0x80

Piece = bytes | memoryview


class UnsupportedStream(ValueError):
    """A stream this packetiser cannot carry (its codec, or parameter sets it lacks)."""


@dataclass
class VideoFormat:
    """How a stream's packets are laid out and the parameter sets its SDP announces."""

    codec: str  # "h264" or "h265"
    length_size: int = 0  # bytes of each NAL unit's length prefix; 0: Annex B start codes
    parameter_sets: list[bytes] = field(default_factory=list)  # VPS (H.265), SPS, PPS

    @classmethod
    def from_extradata(cls, codec: str, extradata: bytes | None) -> VideoFormat:
        if codec not in ("h264", "hevc", "h265"):
            raise UnsupportedStream(f"cannot re-stream {codec} video (H.264 and H.265 only)")
        video = cls("h265" if codec in ("hevc", "h265") else "h264")
        data = extradata or b""
        if len(data) > 6 and data[0] == 1:  # avcC / hvcC: packets carry length prefixes
            if video.codec == "h264":
                video.length_size, units = _avcc(data)
            else:
                video.length_size, units = _hvcc(data)
        else:
            units = [bytes(u) for u in annexb_units(data)]
        video.remember(units)
        return video

    @property
    def parameter_set_types(self) -> tuple[int, ...]:
        return (H264_SPS, H264_PPS) if self.codec == "h264" else (H265_VPS, H265_SPS, H265_PPS)

    def kind(self, unit: Piece) -> int:
        return unit[0] & 0x1F if self.codec == "h264" else (unit[0] >> 1) & 0x3F

    def units(self, data: bytes) -> list[memoryview]:
        """The NAL units of one packet."""
        if self.length_size:
            return length_prefixed_units(data, self.length_size)
        return annexb_units(data)

    def remember(self, units: Sequence[Piece]) -> None:
        """Keep the newest parameter set of each type found in ``units``, in SDP order."""
        found = {self.kind(p): bytes(p) for p in self.parameter_sets}
        for unit in units:
            if len(unit) and self.kind(unit) in self.parameter_set_types:
                found[self.kind(unit)] = bytes(unit)
        self.parameter_sets = [found[t] for t in self.parameter_set_types if t in found]

    @property
    def complete(self) -> bool:
        return len(self.parameter_sets) == len(self.parameter_set_types)

    def with_parameter_sets(self, units: list[memoryview], keyframe: bool) -> Sequence[Piece]:
        """A keyframe that does not carry its parameter sets gets them in front, so that a reader
        joining the media server's stream at any keyframe can decode it; one that does carry
        them updates those kept."""
        if not keyframe:
            return units
        sps = self.parameter_set_types[-2]
        if any(self.kind(u) == sps for u in units if u):
            self.remember(units)
            return units
        return [*self.parameter_sets, *units]


def annexb_units(data: bytes) -> list[memoryview]:
    """NAL units between Annex B start codes (leading zeros of a 4-byte code trimmed)."""
    view = memoryview(data)
    found = data.find(_START_CODE)
    if found < 0:
        return [view] if data else []
    units: list[memoryview] = []
    start = found + 3
    size = len(data)
    while start < size:
        following = data.find(_START_CODE, start)
        end = size if following < 0 else following
        while end > start and data[end - 1] == 0:
            end -= 1
        if end > start:
            units.append(view[start:end])
        if following < 0:
            break
        start = following + 3
    return units


def length_prefixed_units(data: bytes, length_size: int) -> list[memoryview]:
    """NAL units of an ``avcC``/``hvcC``-style packet (each after a big-endian length)."""
    view = memoryview(data)
    units: list[memoryview] = []
    position, size = 0, len(data)
    while position + length_size <= size:
        length = int.from_bytes(data[position : position + length_size], "big")
        position += length_size
        if length == 0 or position + length > size:
            raise UnsupportedStream("a packet's NAL unit lengths do not add up")
        units.append(view[position : position + length])
        position += length
    return units


def _avcc(data: bytes) -> tuple[int, list[bytes]]:
    """(length prefix size, SPS and PPS) from an AVCDecoderConfigurationRecord."""
    try:
        length_size = (data[4] & 0x03) + 1
        units: list[bytes] = []
        position = 5
        for count_mask in (0x1F, 0xFF):  # SPS count in 5 bits, then PPS count in 8
            count = data[position] & count_mask
            position += 1
            for _ in range(count):
                length = int.from_bytes(data[position : position + 2], "big")
                units.append(data[position + 2 : position + 2 + length])
                position += 2 + length
    except IndexError:
        raise UnsupportedStream("the stream's avcC record is truncated") from None
    return length_size, [u for u in units if u]


def _hvcc(data: bytes) -> tuple[int, list[bytes]]:
    """(length prefix size, VPS, SPS and PPS) from an HEVCDecoderConfigurationRecord."""
    try:
        length_size = (data[21] & 0x03) + 1
        units: list[bytes] = []
        position = 23
        for _ in range(data[22]):
            count = int.from_bytes(data[position + 1 : position + 3], "big")
            position += 3
            for _ in range(count):
                length = int.from_bytes(data[position : position + 2], "big")
                units.append(data[position + 2 : position + 2 + length])
                position += 2 + length
    except IndexError:
        raise UnsupportedStream("the stream's hvcC record is truncated") from None
    return length_size, [u for u in units if u]


def media_description(video: VideoFormat, control: str) -> str:
    """The SDP media section that announces ``video`` (RFC 6184 8.2.1, RFC 7798 7.1)."""
    if not video.complete:
        raise UnsupportedStream("the stream's parameter sets are not known yet")
    pt = DYNAMIC_PAYLOAD_TYPE
    encoded = [base64.b64encode(u).decode("ascii") for u in video.parameter_sets]
    if video.codec == "h264":
        profile_level = video.parameter_sets[0][1:4].hex()
        fmtp = (
            f"packetization-mode=1;profile-level-id={profile_level};"
            f"sprop-parameter-sets={','.join(encoded)}"
        )
        encoding = "H264"
    else:
        vps, sps, pps = encoded
        fmtp = f"sprop-vps={vps};sprop-sps={sps};sprop-pps={pps}"
        encoding = "H265"
    return (
        f"m=video 0 RTP/AVP {pt}\r\n"
        f"a=rtpmap:{pt} {encoding}/{CLOCK_RATE_HZ}\r\n"
        f"a=fmtp:{pt} {fmtp}\r\n"
        f"a=control:{control}\r\n"
    )


def session_description(media: str, address: str) -> str:
    """A whole SDP for an ANNOUNCE: one session, the given media sections."""
    family = "IP6" if ":" in address else "IP4"
    return (
        "v=0\r\n"
        f"o=- 0 0 IN {family} {address}\r\n"
        "s=tunnel-agent\r\n"
        f"c=IN {family} {address}\r\n"
        "t=0 0\r\n"
        "a=tool:tunnel-agent\r\n"
        f"{media}"
    )


class VideoPacketizer:
    """One video stream's RTP packets: sequence numbers, SSRC, payload type and fragmentation."""

    def __init__(
        self,
        codec: str,
        channel: int,
        *,
        max_packet_bytes: int = MAX_RTP_PACKET_BYTES,
        sequence: int | None = None,
        ssrc: int | None = None,
    ) -> None:
        self.h264 = codec == "h264"
        self.channel = channel
        self.max_payload_bytes = max_packet_bytes - RTP_HEADER_BYTES
        self.sequence = sequence if sequence is not None else int.from_bytes(os.urandom(2))
        self.ssrc = ssrc if ssrc is not None else int.from_bytes(os.urandom(4))
        self.packets = 0

    def packetize(self, units: Sequence[Piece], timestamp: int, out: list[Piece]) -> int:
        """Append one access unit's packets (at RTP time ``timestamp``) to ``out``; their bytes."""
        written = 0
        last = len(units) - 1
        single, limit = _SINGLE.pack, self.max_payload_bytes
        timestamp &= 0xFFFFFFFF
        for index, unit in enumerate(units):
            size = len(unit)
            if size <= limit:
                marker = 0x80 if index == last else 0
                out.append(
                    single(
                        INTERLEAVED,
                        self.channel,
                        RTP_HEADER_BYTES + size,
                        RTP_V2,
                        marker | DYNAMIC_PAYLOAD_TYPE,
                        self.sequence,
                        timestamp,
                        self.ssrc,
                    )
                )
                out.append(unit)
                self.sequence = (self.sequence + 1) & 0xFFFF
                self.packets += 1
                written += 4 + RTP_HEADER_BYTES + size
            else:
                written += self._fragments(unit, timestamp, index == last, out)
        return written

    def _fragments(self, unit: Piece, timestamp: int, last_unit: bool, out: list[Piece]) -> int:
        view = memoryview(unit)
        indicator: tuple[int, ...]
        if self.h264:
            header_bytes, overhead, pack = 1, 2, _FU_H264.pack
            kind = unit[0] & 0x1F
            indicator = ((unit[0] & 0xE0) | H264_FU_A,)
        else:
            header_bytes, overhead, pack = 2, 3, _FU_H265.pack
            kind = (unit[0] >> 1) & 0x3F
            indicator = ((unit[0] & 0x81) | (H265_FU << 1), unit[1])
        chunk = self.max_payload_bytes - overhead
        position, size = header_bytes, len(unit)
        written = 0
        while position < size:
            end = min(position + chunk, size)
            start_bit = 0x80 if position == header_bytes else 0
            end_bit = 0x40 if end == size else 0
            marker = 0x80 if end_bit and last_unit else 0
            out.append(
                pack(
                    INTERLEAVED,
                    self.channel,
                    RTP_HEADER_BYTES + overhead + end - position,
                    RTP_V2,
                    marker | DYNAMIC_PAYLOAD_TYPE,
                    self.sequence,
                    timestamp,
                    self.ssrc,
                    *indicator,
                    start_bit | end_bit | kind,
                )
            )
            out.append(view[position:end])
            self.sequence = (self.sequence + 1) & 0xFFFF
            self.packets += 1
            written += 4 + RTP_HEADER_BYTES + overhead + end - position
            position = end
        return written
