"""RTP payloads back into access units: H.264 (RFC 6184), H.265 (RFC 7798), AAC (RFC 3640).

Pure code. A depacketiser is fed whole RTP packets (``push``) and calls back with each finished
access unit. A gap in sequence numbers drops the frame being assembled and every frame after it up
to the next keyframe: a decoder fed a frame with a hole, or one whose reference is missing, shows
garbage until the next keyframe anyway, and a player fed nothing shows the last good picture.
Video timestamps are the RTP clock (90 kHz), audio's the SDP's clock, both extended past the
32-bit wrap (``rtp.Timeline``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tunnel_agent.rtsp.errors import RtspProtocolError
from tunnel_agent.rtsp.rtp import Timeline, parse_rtp
from tunnel_agent.rtsp.sdp import MediaDescription, base64_list

H264_IDR = 5
H264_SPS, H264_PPS = 7, 8
H264_STAP_A, H264_FU_A = 24, 28
H265_VPS, H265_SPS, H265_PPS = 32, 33, 34
H265_IRAP = range(16, 22)  # BLA, IDR, CRA: a decoder can start there
H265_AP, H265_FU = 48, 49
AAC_FRAME_SAMPLES = 1024


@dataclass(slots=True)
class VideoAccessUnit:
    units: list[bytes]  # NAL units, without start codes or length prefixes
    timestamp: int  # extended RTP timestamp (90 kHz)
    keyframe: bool


@dataclass(slots=True)
class AudioAccessUnit:
    data: bytes  # one raw AAC frame
    timestamp: int  # extended RTP timestamp, in the stream's clock (usually its sample rate)


class _Stream:
    """What every depacketiser does with an RTP packet before its payload: the header, sequence
    continuity and the extended timestamp."""

    def __init__(self) -> None:
        self.timeline = Timeline()
        self.frames_dropped = 0
        self.packets_ignored = 0

    def set_reference(self, rtptime: int) -> None:
        self.timeline.set_reference(rtptime)

    def _read(self, packet: memoryview | bytes) -> tuple[int, int, bool, int, int] | None:
        """(packets lost before it, extended timestamp, marker, payload start, payload end);
        None for a packet to ignore (malformed, late or repeated)."""
        parsed = parse_rtp(packet)
        if parsed is None:
            self.packets_ignored += 1
            return None
        sequence, raw_timestamp, marker, start, end = parsed
        gap = self.timeline.sequence(sequence)
        if gap < 0:
            self.packets_ignored += 1  # late or repeated: the frame it belonged to is gone
            return None
        return gap, self.timeline.extend(raw_timestamp), marker, start, end


class _Video(_Stream):
    """What H.264 and H.265 share: access units from NAL units, loss, parameter sets."""

    nal_header_bytes = 1
    keyframe_types: frozenset[int] = frozenset()
    parameter_set_types: frozenset[int] = frozenset()

    def __init__(
        self, on_unit: Callable[[VideoAccessUnit], None], parameter_sets: list[bytes] | None = None
    ) -> None:
        super().__init__()
        self.on_unit = on_unit
        self.parameter_sets: dict[int, bytes] = {}  # by NAL type, the latest seen (SDP, in-band)
        for unit in parameter_sets or []:
            self._remember(unit)
        self._units: list[bytes] = []
        self._fragments: list[bytes | memoryview] = []
        self._timestamp = 0
        self._broken = False  # a packet of the current frame was lost or malformed
        self._awaiting_keyframe = False

    def push(self, packet: memoryview | bytes) -> None:
        read = self._read(packet)
        if read is None:
            return
        gap, timestamp, marker, start, end = read
        if gap > 0:
            self._broken = True  # the lost packets were this frame's, or the next one's, or both
        if timestamp != self._timestamp and (self._units or self._fragments or self._broken):
            self._finish()  # the last frame ended without a marker bit
            self._broken = gap > 0
        self._timestamp = timestamp
        if end > start:
            self._payload(packet[start:end])
        if marker:
            self._finish()

    def _payload(self, payload: memoryview | bytes) -> None:
        raise NotImplementedError

    def _kind(self, unit: bytes | memoryview) -> int:
        raise NotImplementedError

    def _fragment(self, header: bytes, data: memoryview | bytes, first: bool, last: bool) -> None:
        if first:
            if self._fragments:
                self._broken = True  # the previous unit never got its last fragment
            self._fragments = [header, data]
        elif not self._fragments:
            self._broken = True  # the start of this unit was lost
            return
        else:
            self._fragments.append(data)
        if last:
            self._units.append(b"".join(self._fragments))
            self._fragments = []

    def _units_from_aggregate(self, unit: memoryview | bytes | None) -> None:
        if unit is None:
            self._broken = True
        else:
            self._unit(unit)

    def _unit(self, data: memoryview | bytes) -> None:
        if len(data) >= self.nal_header_bytes:
            self._units.append(bytes(data))
        else:
            self._broken = True

    def _finish(self) -> None:
        units, self._units = self._units, []
        if self._fragments:
            self._fragments = []
            self._broken = True
        if self._broken:
            self._broken = False
            self._awaiting_keyframe = True
            if units:
                self.frames_dropped += 1
            return
        if not units:
            return
        kinds = [self._kind(u) for u in units]
        keyframe = not self.keyframe_types.isdisjoint(kinds)
        if self._awaiting_keyframe:
            if not keyframe:
                self.frames_dropped += 1
                return
            self._awaiting_keyframe = False
        for unit, kind in zip(units, kinds, strict=True):
            if kind in self.parameter_set_types:
                self.parameter_sets[kind] = unit
        self.on_unit(VideoAccessUnit(units, self._timestamp, keyframe))

    def _remember(self, unit: bytes) -> None:
        kind = self._kind(unit)
        if kind in self.parameter_set_types:
            self.parameter_sets[kind] = unit


class H264Depacketizer(_Video):
    """Single NAL unit, STAP-A and FU-A packets (packetization-mode 0 and 1)."""

    keyframe_types = frozenset({H264_IDR})
    parameter_set_types = frozenset({H264_SPS, H264_PPS})

    @classmethod
    def from_sdp(
        cls, media: MediaDescription, on_unit: Callable[[VideoAccessUnit], None]
    ) -> H264Depacketizer:
        return cls(on_unit, base64_list(media.fmtp.get("sprop-parameter-sets")))

    def _kind(self, unit: bytes | memoryview) -> int:
        return unit[0] & 0x1F

    def _payload(self, payload: memoryview | bytes) -> None:
        kind = payload[0] & 0x1F
        if kind < H264_STAP_A:
            self._unit(payload)
        elif kind == H264_STAP_A:
            _aggregate(payload, 1, self._units_from_aggregate)
        elif kind == H264_FU_A and len(payload) > 2:
            fu = payload[1]
            header = bytes([(payload[0] & 0xE0) | (fu & 0x1F)])
            self._fragment(header, payload[2:], bool(fu & 0x80), bool(fu & 0x40))
        else:
            self.packets_ignored += 1  # STAP-B, MTAP, FU-B: interleaved mode, not negotiated


class H265Depacketizer(_Video):
    """Single NAL unit, aggregation (AP) and fragmentation (FU) packets, without DONL fields."""

    nal_header_bytes = 2
    keyframe_types = frozenset(H265_IRAP)
    parameter_set_types = frozenset({H265_VPS, H265_SPS, H265_PPS})

    @classmethod
    def from_sdp(
        cls, media: MediaDescription, on_unit: Callable[[VideoAccessUnit], None]
    ) -> H265Depacketizer:
        sets = [
            unit
            for name in ("sprop-vps", "sprop-sps", "sprop-pps")
            for unit in base64_list(media.fmtp.get(name))
        ]
        return cls(on_unit, sets)

    def _kind(self, unit: bytes | memoryview) -> int:
        return (unit[0] >> 1) & 0x3F

    def _payload(self, payload: memoryview | bytes) -> None:
        if len(payload) < 2:
            self._broken = True
            return
        kind = (payload[0] >> 1) & 0x3F
        if kind < H265_AP:
            self._unit(payload)
        elif kind == H265_AP:
            _aggregate(payload, 2, self._units_from_aggregate)
        elif kind == H265_FU and len(payload) > 3:
            fu = payload[2]
            header = bytes([(payload[0] & 0x81) | ((fu & 0x3F) << 1), payload[1]])
            self._fragment(header, payload[3:], bool(fu & 0x80), bool(fu & 0x40))
        else:
            self.packets_ignored += 1  # PACI, or a fragment too short to carry data


def _aggregate(
    payload: memoryview | bytes, offset: int, take: Callable[[memoryview | bytes | None], None]
) -> None:
    """Each unit of an aggregation packet (16-bit size, unit, ...); None for a truncated one."""
    size = len(payload)
    while offset + 2 <= size:
        length = (payload[offset] << 8) | payload[offset + 1]
        offset += 2
        if length == 0 or offset + length > size:
            take(None)
            return
        take(payload[offset : offset + length])
        offset += length


class AacDepacketizer(_Stream):
    """MPEG-4 audio in ``mpeg4-generic`` (RFC 3640): AU headers, then the access units.

    AAC-hbr (13-bit sizes, 3-bit indices) is what cameras send; other sizes from the SDP are read
    the same way. An access unit larger than one packet comes in fragments, the last one marked.
    """

    def __init__(
        self,
        on_unit: Callable[[AudioAccessUnit], None],
        size_length: int = 13,
        index_length: int = 3,
        index_delta_length: int = 3,
        frame_samples: int = AAC_FRAME_SAMPLES,
    ) -> None:
        if size_length <= 0:
            raise ValueError("mpeg4-generic without sizelength carries no AU headers")
        super().__init__()
        self.on_unit = on_unit
        self.size_length = size_length
        self.index_length = index_length
        self.index_delta_length = index_delta_length
        self.frame_samples = frame_samples
        self._fragments: list[memoryview | bytes] = []
        self._fragment_bytes = 0
        self._fragment_size = 0

    @classmethod
    def from_sdp(
        cls, media: MediaDescription, on_unit: Callable[[AudioAccessUnit], None]
    ) -> AacDepacketizer:
        fmtp = media.fmtp
        try:
            return cls(
                on_unit,
                int(fmtp.get("sizelength", "0")),
                int(fmtp.get("indexlength", "0")),
                int(fmtp.get("indexdeltalength", "0")),
                int(fmtp.get("constantduration", str(AAC_FRAME_SAMPLES))),
            )
        except ValueError as exc:
            raise RtspProtocolError(f"the camera's AAC format is not usable ({exc})") from None

    def push(self, packet: memoryview | bytes) -> None:
        read = self._read(packet)
        if read is None:
            return
        gap, timestamp, marker, start, end = read
        if gap > 0 and self._fragments:
            self._fragments = []
            self.frames_dropped += 1
        payload = packet[start:end]
        sizes = self._sizes(payload)
        if sizes is None:
            self.packets_ignored += 1
            return
        offset, lengths = sizes
        if self._fragments or (len(lengths) == 1 and offset + lengths[0] > len(payload)):
            self._fragment(payload[offset:], lengths[0], marker, timestamp)
            return
        for index, length in enumerate(lengths):
            if offset + length > len(payload):
                self.frames_dropped += len(lengths) - index
                return
            data = bytes(payload[offset : offset + length])
            self.on_unit(AudioAccessUnit(data, timestamp + index * self.frame_samples))
            offset += length

    def _sizes(self, payload: memoryview | bytes) -> tuple[int, list[int]] | None:
        """(where the access units start, their sizes) from the AU header section."""
        if len(payload) < 2:
            return None
        header_bits = (payload[0] << 8) | payload[1]
        header_bytes = (header_bits + 7) // 8
        if 2 + header_bytes > len(payload):
            return None
        bits = int.from_bytes(payload[2 : 2 + header_bytes], "big")
        total = header_bytes * 8
        position = 0
        lengths: list[int] = []
        while position + self.size_length <= header_bits:
            index_bits = self.index_length if not lengths else self.index_delta_length
            shift = total - position - self.size_length
            lengths.append((bits >> shift) & ((1 << self.size_length) - 1))
            position += self.size_length + index_bits
        return (2 + header_bytes, lengths) if lengths else None

    def _fragment(self, data: memoryview | bytes, size: int, last: bool, timestamp: int) -> None:
        if not self._fragments:
            self._fragment_size = size
            self._fragment_bytes = 0
        self._fragments.append(data)
        self._fragment_bytes += len(data)
        if not last:
            return
        whole = b"".join(self._fragments)
        self._fragments = []
        if len(whole) == self._fragment_size:
            self.on_unit(AudioAccessUnit(whole, timestamp))
        else:
            self.frames_dropped += 1
