"""Just enough ISO BMFF (MP4) reading to cut a fragmented MP4 stream and describe it to MSE.

The muxer (FFmpeg's, through PyAV) writes an init segment (``ftyp`` + ``moov``) and then
fragments (``moof`` + ``mdat``) of a few frames each. The fan-out needs three facts it does not
tell us directly: where each top-level box ends, whether a fragment starts with a video keyframe
(a late joiner must start there), and the RFC 6381 codec strings (``avc1.64001f``,
``hvc1.1.6.L93.B0``, ``mp4a.40.2``) that ``MediaSource.isTypeSupported`` wants. Pure functions
over bytes, no I/O.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

HEADER_BYTES = 8
MAX_BOX_BYTES = 64 * 1024 * 1024  # a single frame larger than this is not a camera stream

# Bytes between a sample entry's header and its child boxes (ISO/IEC 14496-12, 12.1 and 12.2).
VISUAL_SAMPLE_ENTRY_BYTES = 78
AUDIO_SAMPLE_ENTRY_BYTES = 28
STSD_PREFIX_BYTES = 8  # version/flags + entry_count

# Sample flags (14496-12, 8.8.3.1): sample_is_non_sync_sample.
NON_SYNC_SAMPLE = 0x0001_0000
TFHD_DEFAULT_SAMPLE_FLAGS = 0x0000_20
TRUN_DATA_OFFSET = 0x0000_01
TRUN_FIRST_SAMPLE_FLAGS = 0x0000_04
TRUN_SAMPLE_DURATION = 0x0001_00
TRUN_SAMPLE_SIZE = 0x0002_00
TRUN_SAMPLE_FLAGS = 0x0004_00


class MalformedMp4(ValueError):
    """The muxer's output could not be parsed (a bug or a corrupted stream, never user input)."""


def iter_boxes(
    data: bytes | memoryview, start: int = 0, end: int | None = None
) -> Iterator[tuple[bytes, memoryview]]:
    """(type, payload) of each box in ``data[start:end]``."""
    view = memoryview(data)
    end = len(view) if end is None else end
    offset = start
    while offset + HEADER_BYTES <= end:
        size, kind = struct.unpack_from(">I4s", view, offset)
        header = HEADER_BYTES
        if size == 1:
            (size,) = struct.unpack_from(">Q", view, offset + HEADER_BYTES)
            header = 16
        elif size == 0:
            size = end - offset
        if size < header or offset + size > end:
            raise MalformedMp4(f"box {kind!r} of {size} bytes overruns its parent")
        yield bytes(kind), view[offset + header : offset + size]
        offset += size


def child(payload: memoryview, kind: bytes, skip: int = 0) -> memoryview | None:
    for found, inner in iter_boxes(payload, skip):
        if found == kind:
            return inner
    return None


def path(payload: memoryview, *kinds: bytes) -> memoryview | None:
    """The box reached by following ``kinds`` from ``payload`` (first match at each level)."""
    current: memoryview | None = payload
    for kind in kinds:
        if current is None:
            return None
        current = child(current, kind)
    return current


class BoxSplitter:
    """Cuts a byte stream into complete top-level boxes as the muxer writes it."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        self._buffer += data
        boxes: list[tuple[bytes, bytes]] = []
        while len(self._buffer) >= HEADER_BYTES:
            size, kind = struct.unpack_from(">I4s", self._buffer)
            if size == 1 and len(self._buffer) >= 16:
                (size,) = struct.unpack_from(">Q", self._buffer, HEADER_BYTES)
            elif size == 1:
                break
            if size < HEADER_BYTES or size > MAX_BOX_BYTES:
                raise MalformedMp4(f"top-level box {bytes(kind)!r} claims {size} bytes")
            if len(self._buffer) < size:
                break
            boxes.append((bytes(kind), bytes(self._buffer[:size])))
            del self._buffer[:size]
        return boxes

    @property
    def pending_bytes(self) -> int:
        return len(self._buffer)


@dataclass(frozen=True)
class TrackInfo:
    track_id: int
    handler: str  # "vide" or "soun"
    codec: str  # RFC 6381 string for MSE
    width: int = 0
    height: int = 0


@dataclass(frozen=True)
class InitInfo:
    tracks: tuple[TrackInfo, ...]

    @property
    def video(self) -> TrackInfo | None:
        return next((t for t in self.tracks if t.handler == "vide"), None)

    @property
    def mime_type(self) -> str:
        codecs = ", ".join(t.codec for t in self.tracks)
        return f'video/mp4; codecs="{codecs}"'


def describe_init(moov: bytes) -> InitInfo:
    """Tracks of an init segment's ``moov`` box (the whole box, header included)."""
    body = memoryview(moov)[HEADER_BYTES:]
    tracks: list[TrackInfo] = []
    for kind, trak in iter_boxes(body):
        if kind != b"trak":
            continue
        tkhd = child(trak, b"tkhd")
        hdlr = path(trak, b"mdia", b"hdlr")
        stsd = path(trak, b"mdia", b"minf", b"stbl", b"stsd")
        if tkhd is None or hdlr is None or stsd is None:
            raise MalformedMp4("trak without tkhd, hdlr or stsd")
        track_id = struct.unpack_from(">I", tkhd, 20 if tkhd[0] == 1 else 12)[0]
        handler = bytes(hdlr[8:12]).decode("ascii", "replace")
        entry_kind, entry = next(iter_boxes(stsd, STSD_PREFIX_BYTES))
        tracks.append(_track(track_id, handler, entry_kind, entry))
    return InitInfo(tuple(tracks))


def _track(track_id: int, handler: str, entry_kind: bytes, entry: memoryview) -> TrackInfo:
    name = entry_kind.decode("ascii", "replace")
    if handler == "vide":
        width, height = struct.unpack_from(">HH", entry, 24)
        children = entry[VISUAL_SAMPLE_ENTRY_BYTES:]
        if entry_kind in (b"avc1", b"avc3"):
            avcc = child(children, b"avcC")
            codec = name if avcc is None else f"{name}.{bytes(avcc[1:4]).hex()}"
        elif entry_kind in (b"hvc1", b"hev1"):
            hvcc = child(children, b"hvcC")
            codec = name if hvcc is None else hevc_codec_string(name, bytes(hvcc))
        else:
            codec = name
        return TrackInfo(track_id, handler, codec, width, height)
    if entry_kind == b"mp4a":
        esds = child(entry[AUDIO_SAMPLE_ENTRY_BYTES:], b"esds")
        codec = "mp4a.40.2" if esds is None else aac_codec_string(bytes(esds))
        return TrackInfo(track_id, handler, codec)
    return TrackInfo(track_id, handler, name)


def hevc_codec_string(entry_name: str, hvcc: bytes) -> str:
    """``hvc1.<space><profile>.<compat>.<tier><level>.<constraints>`` (ISO/IEC 14496-15 E.3)."""
    if len(hvcc) < 13:
        raise MalformedMp4("hvcC too short")
    space = ("", "A", "B", "C")[hvcc[1] >> 6]
    tier = "H" if hvcc[1] & 0x20 else "L"
    profile = hvcc[1] & 0x1F
    compatibility = int.from_bytes(hvcc[2:6], "big")
    reversed_bits = int(f"{compatibility:032b}"[::-1], 2)
    constraints = list(hvcc[6:12])
    while constraints and constraints[-1] == 0:
        constraints.pop()
    parts = [entry_name, f"{space}{profile}", f"{reversed_bits:x}", f"{tier}{hvcc[12]}"]
    parts += [f"{byte:x}" for byte in constraints]
    return ".".join(parts)


def aac_codec_string(esds: bytes) -> str:
    """``mp4a.40.<audio object type>`` from the DecoderSpecificInfo inside ``esds``."""
    view = memoryview(esds)[4:]  # version and flags
    offset = 0
    object_type = 0x40
    while offset < len(view):
        tag = view[offset]
        offset += 1
        size = 0
        for _ in range(4):
            byte = view[offset]
            offset += 1
            size = (size << 7) | (byte & 0x7F)
            if not byte & 0x80:
                break
        if tag == 0x03:  # ES_Descriptor: ES_ID, flags, then nested descriptors
            flags = view[offset + 2]
            offset += 3 + (2 if flags & 0x80 else 0)
            if flags & 0x40:
                offset += 1 + view[offset]
            offset += 2 if flags & 0x20 else 0
        elif tag == 0x04:  # DecoderConfigDescriptor: 13 fixed bytes, then DecoderSpecificInfo
            object_type = view[offset]
            offset += 13
        elif tag == 0x05:
            audio_object_type = view[offset] >> 3
            return f"mp4a.{object_type:x}.{audio_object_type}"
        else:
            offset += size
    return f"mp4a.{object_type:x}"


def fragment_starts_with_sync(moof: bytes, video_track_id: int) -> bool:
    """Whether the video track's first sample in this ``moof`` is a sync sample (a keyframe)."""
    body = memoryview(moof)[HEADER_BYTES:]
    for kind, traf in iter_boxes(body):
        if kind != b"traf":
            continue
        tfhd = child(traf, b"tfhd")
        trun = child(traf, b"trun")
        if tfhd is None or trun is None:
            continue
        track_id = struct.unpack_from(">I", tfhd, 4)[0]
        if track_id != video_track_id:
            continue
        return not _first_sample_flags(tfhd, trun) & NON_SYNC_SAMPLE
    return False


def _first_sample_flags(tfhd: memoryview, trun: memoryview) -> int:
    tfhd_flags = int.from_bytes(tfhd[1:4], "big")
    default_flags = 0
    if tfhd_flags & TFHD_DEFAULT_SAMPLE_FLAGS:
        offset = 8
        for bit, size in ((0x01, 8), (0x02, 4), (0x08, 4), (0x10, 4)):
            if tfhd_flags & bit:
                offset += size
        default_flags = struct.unpack_from(">I", tfhd, offset)[0]
    trun_flags = int.from_bytes(trun[1:4], "big")
    offset = 8  # version/flags, sample_count
    if trun_flags & TRUN_DATA_OFFSET:
        offset += 4
    if trun_flags & TRUN_FIRST_SAMPLE_FLAGS:
        return int(struct.unpack_from(">I", trun, offset)[0])
    if trun_flags & TRUN_SAMPLE_FLAGS:
        offset += 4 * bool(trun_flags & TRUN_SAMPLE_DURATION)
        offset += 4 * bool(trun_flags & TRUN_SAMPLE_SIZE)
        return int(struct.unpack_from(">I", trun, offset)[0])
    return default_flags
