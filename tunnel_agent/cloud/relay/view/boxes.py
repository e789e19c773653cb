"""Just enough ISO BMFF (MP4) reading to describe an init segment to MSE.

The page needs the RFC 6381 codec strings (``avc1.64001f``, ``hvc1.1.6.L93.B0``, ``mp4a.40.2``)
that ``MediaSource.isTypeSupported`` wants, and the picture size; both are read back from the
``moov`` the relay writes (``fmp4.py``), so what the page is told is what the bytes say. Pure
functions over bytes, no I/O.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

HEADER_BYTES = 8

# Bytes between a sample entry's header and its child boxes (ISO/IEC 14496-12, 12.1 and 12.2).
VISUAL_SAMPLE_ENTRY_BYTES = 78
AUDIO_SAMPLE_ENTRY_BYTES = 28
STSD_PREFIX_BYTES = 8  # version/flags + entry_count


class MalformedMp4(ValueError):
    """An init segment could not be parsed (a bug, never user input)."""


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
