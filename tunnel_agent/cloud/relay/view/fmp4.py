"""Fragmented MP4 written from demuxed packets: an init segment, then ``moof`` + ``mdat`` fragments.

MSE needs little of what a general MP4 muxer does: one sample entry per track (``avcC``/``hvcC``/
``esds`` from the stream's parameter sets) and, per fragment, each track's base decode time and a
table of sample durations, sizes, flags and composition offsets. Writing those here costs a few
``struct.pack`` calls per fragment and one copy of the payload, where FFmpeg's muxer through PyAV
costs a ``mux`` call per packet and a Python file object's writes per fragment.

Pure code, no I/O and no PyAV: ``remux.py`` feeds it the access units the RTP depacketisers give.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from tunnel_agent.rtsp import codec_info

MOVIE_TIMESCALE = 1000
LANGUAGE_UNDETERMINED = 0x55C4  # "und", packed ISO 639-2/T
NAL_LENGTH_BYTES = 4

# Sample flags (ISO/IEC 14496-12, 8.8.3.1).
SYNC_SAMPLE_FLAGS = 0x0200_0000  # depends on no other sample
NON_SYNC_SAMPLE_FLAGS = 0x0101_0000  # depends on others; sample_is_non_sync_sample
TFHD_DEFAULT_BASE_IS_MOOF = 0x02_0000
TRUN_FLAGS = 0x0001 | 0x0100 | 0x0200 | 0x0400 | 0x0800  # offset, duration, size, flags, cto
TRUN_SAMPLE_BYTES = 16
MOOF_FIXED_BYTES = 8 + 16  # moof header + mfhd
TRAF_FIXED_BYTES = 8 + 16 + 20 + 20  # traf header + tfhd + tfdt (v1) + trun header fields

H264_SPS, H264_PPS = 7, 8
HEVC_VPS, HEVC_SPS, HEVC_PPS = 32, 33, 34
AAC_FRAME_SAMPLES = 1024

IDENTITY_MATRIX = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)


class UnusableStream(ValueError):
    """The stream lacks what an init segment needs (no parameter sets); the reason is for users."""


def box(kind: bytes, *parts: bytes) -> bytes:
    payload = b"".join(parts)
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


def full_box(kind: bytes, version: int, flags: int, *parts: bytes) -> bytes:
    return box(kind, struct.pack(">I", (version << 24) | flags), *parts)


# -- NAL units ----------------------------------------------------------------------------------


def length_prefixed(units: Iterable[bytes]) -> bytes:
    """NAL units as MP4 samples carry them: each after its size in ``NAL_LENGTH_BYTES``."""
    return b"".join(struct.pack(">I", len(unit)) + unit for unit in units)


# -- sample entries -----------------------------------------------------------------------------


def avcc(sps: Sequence[bytes], pps: Sequence[bytes]) -> bytes:
    """AVCDecoderConfigurationRecord (ISO/IEC 14496-15, 5.3.3.1)."""
    if not sps or not pps:
        raise UnusableStream("the camera's H.264 stream carries no SPS/PPS")
    first = sps[0]
    record = bytes([1, first[1], first[2], first[3], 0xFC | (NAL_LENGTH_BYTES - 1)])
    record += bytes([0xE0 | len(sps)]) + b"".join(struct.pack(">H", len(u)) + u for u in sps)
    record += bytes([len(pps)]) + b"".join(struct.pack(">H", len(u)) + u for u in pps)
    return record


def hvcc(
    vps: Sequence[bytes], sps: Sequence[bytes], pps: Sequence[bytes], chroma: int, bit_depth: int
) -> bytes:
    """HEVCDecoderConfigurationRecord (ISO/IEC 14496-15, 8.3.3.1).

    Profile, tier, level and constraint flags are copied from the SPS's general
    profile_tier_level (its first 12 bytes after the header byte); decoders take everything else
    from the parameter sets in the arrays.
    """
    if not vps or not sps or not pps:
        raise UnusableStream("the camera's H.265 stream carries no VPS/SPS/PPS")
    rbsp = codec_info.rbsp(sps[0], 0)
    if len(rbsp) < 15:
        raise UnusableStream("the camera's H.265 SPS is too short")
    sub_layers = ((rbsp[2] >> 1) & 0x07) + 1
    nested = rbsp[2] & 0x01
    record = bytes([1]) + rbsp[3:15]
    depth = 0xF8 | (bit_depth - 8)
    record += struct.pack(">HBBBBH", 0xF000, 0xFC, 0xFC | chroma, depth, depth, 0)
    record += bytes([(sub_layers << 3) | (nested << 2) | (NAL_LENGTH_BYTES - 1), 3])
    for nal_type, units in ((HEVC_VPS, vps), (HEVC_SPS, sps), (HEVC_PPS, pps)):
        record += struct.pack(">BH", 0x80 | nal_type, len(units))
        record += b"".join(struct.pack(">H", len(u)) + u for u in units)
    return record


def esds(audio_specific_config: bytes, track_id: int) -> bytes:
    """ES_Descriptor with the AAC AudioSpecificConfig (ISO/IEC 14496-1, 7.2.6.5)."""

    def descriptor(tag: int, payload: bytes) -> bytes:
        return bytes([tag, 0x80, 0x80, 0x80, len(payload)]) + payload

    specific = descriptor(0x05, audio_specific_config)
    config = descriptor(0x04, bytes([0x40, 0x15]) + bytes(3) + bytes(8) + specific)
    es = descriptor(0x03, struct.pack(">HB", track_id, 0) + config + descriptor(0x06, b"\x02"))
    return full_box(b"esds", 0, 0, es)


@dataclass(frozen=True)
class VideoTrack:
    codec: str  # FFmpeg's name: "h264" or "hevc"
    width: int
    height: int
    timescale: int
    config: bytes  # avcC or hvcC payload
    track_id: int = 1

    def sample_entry(self) -> bytes:
        kind, config_kind = (b"avc1", b"avcC") if self.codec == "h264" else (b"hvc1", b"hvcC")
        visual = bytes(6) + struct.pack(">H", 1) + bytes(16)
        visual += struct.pack(">HHIIIH", self.width, self.height, 0x480000, 0x480000, 0, 1)
        visual += bytes(32) + struct.pack(">Hh", 0x18, -1)
        return box(kind, visual, box(config_kind, self.config))


@dataclass(frozen=True)
class AudioTrack:
    sample_rate: int
    channels: int
    timescale: int
    audio_specific_config: bytes
    track_id: int = 2

    def sample_entry(self) -> bytes:
        audio = bytes(6) + struct.pack(">H", 1) + bytes(8)
        audio += struct.pack(">HHHHI", self.channels, 16, 0, 0, min(self.sample_rate, 0xFFFF) << 16)
        return box(b"mp4a", audio, esds(self.audio_specific_config, self.track_id))


Track = VideoTrack | AudioTrack


def init_segment(tracks: Sequence[Track]) -> bytes:
    """``ftyp`` + ``moov`` for ``tracks`` (no samples: they all come in fragments)."""
    ftyp = box(b"ftyp", b"iso5", struct.pack(">I", 512), b"iso5iso6mp41")
    mvhd = full_box(
        b"mvhd",
        0,
        0,
        struct.pack(">IIIIIH", 0, 0, MOVIE_TIMESCALE, 0, 0x10000, 0x0100),
        bytes(10),
        IDENTITY_MATRIX,
        bytes(24),
        struct.pack(">I", max(t.track_id for t in tracks) + 1),
    )
    traks = [_trak(t) for t in tracks]
    trex = [full_box(b"trex", 0, 0, struct.pack(">5I", t.track_id, 1, 0, 0, 0)) for t in tracks]
    return ftyp + box(b"moov", mvhd, *traks, box(b"mvex", *trex))


def _trak(track: Track) -> bytes:
    video = isinstance(track, VideoTrack)
    width, height = (track.width, track.height) if isinstance(track, VideoTrack) else (0, 0)
    tkhd = full_box(
        b"tkhd",
        0,
        0x000003,  # enabled, in movie
        struct.pack(">IIIII", 0, 0, track.track_id, 0, 0),
        bytes(8),
        struct.pack(">hhhH", 0, 0, 0 if video else 0x0100, 0),
        IDENTITY_MATRIX,
        struct.pack(">II", width << 16, height << 16),
    )
    mdhd = full_box(
        b"mdhd", 0, 0, struct.pack(">IIIIHH", 0, 0, track.timescale, 0, LANGUAGE_UNDETERMINED, 0)
    )
    handler, name = (b"vide", b"VideoHandler\x00") if video else (b"soun", b"SoundHandler\x00")
    hdlr = full_box(b"hdlr", 0, 0, bytes(4), handler, bytes(12), name)
    media_header = full_box(b"vmhd", 0, 1, bytes(8)) if video else full_box(b"smhd", 0, 0, bytes(4))
    dinf = box(b"dinf", full_box(b"dref", 0, 0, struct.pack(">I", 1), full_box(b"url ", 0, 1)))
    stbl = box(
        b"stbl",
        full_box(b"stsd", 0, 0, struct.pack(">I", 1), track.sample_entry()),
        full_box(b"stts", 0, 0, bytes(4)),
        full_box(b"stsc", 0, 0, bytes(4)),
        full_box(b"stsz", 0, 0, bytes(8)),
        full_box(b"stco", 0, 0, bytes(4)),
    )
    minf = box(b"minf", media_header, dinf, stbl)
    return box(b"trak", tkhd, box(b"mdia", mdhd, hdlr, minf))


# -- fragments ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Sample:
    data: bytes
    decode_time: int  # in the track's timescale, from the start of the stream
    composition_offset: int
    sync: bool
    duration: int = 0


@dataclass(slots=True)
class _TrackRun:
    track_id: int
    samples: list[Sample] = field(default_factory=list)
    last_duration: int = 0


def fragment(sequence: int, runs: Sequence[tuple[int, Sequence[Sample]]]) -> bytes:
    """One ``moof`` + ``mdat`` holding ``runs``: (track id, its samples), each non-empty."""
    moof_bytes = MOOF_FIXED_BYTES + sum(
        TRAF_FIXED_BYTES + TRUN_SAMPLE_BYTES * len(samples) for _, samples in runs
    )
    offset = moof_bytes + 8  # the first sample follows the mdat header
    trafs: list[bytes] = []
    payload: list[bytes] = []
    for track_id, samples in runs:
        table = b"".join(
            struct.pack(
                ">IIIi",
                s.duration,
                len(s.data),
                SYNC_SAMPLE_FLAGS if s.sync else NON_SYNC_SAMPLE_FLAGS,
                s.composition_offset,
            )
            for s in samples
        )
        trafs.append(
            box(
                b"traf",
                full_box(b"tfhd", 0, TFHD_DEFAULT_BASE_IS_MOOF, struct.pack(">I", track_id)),
                full_box(b"tfdt", 1, 0, struct.pack(">Q", samples[0].decode_time)),
                full_box(b"trun", 1, TRUN_FLAGS, struct.pack(">Ii", len(samples), offset), table),
            )
        )
        for sample in samples:
            payload.append(sample.data)
            offset += len(sample.data)
    moof = box(b"moof", full_box(b"mfhd", 0, 0, struct.pack(">I", sequence)), *trafs)
    assert len(moof) == moof_bytes
    mdat_bytes = offset - moof_bytes
    return b"".join([moof, struct.pack(">I4s", mdat_bytes, b"mdat"), *payload])


class Fragmenter:
    """Collects samples and cuts a fragment before each keyframe and every ``fragment_s``.

    A sample's duration is the distance to the next one of its track, so a fragment is cut when
    the video sample after it arrives: that one's decode time ends the last video duration. Audio
    samples still open at the cut take their predecessor's duration (AAC frames all last the same).
    """

    def __init__(self, video: VideoTrack, audio: AudioTrack | None, fragment_s: float) -> None:
        self.video = video
        self.audio = audio
        self._fragment_ticks = int(fragment_s * video.timescale)
        self._runs = {video.track_id: _TrackRun(video.track_id)}
        if audio is not None:
            self._runs[audio.track_id] = _TrackRun(audio.track_id)
            self._audio_frame_ticks = AAC_FRAME_SAMPLES * audio.timescale // audio.sample_rate
        self._sequence = 0
        self._started_at = 0

    def add_video(self, sample: Sample) -> tuple[bytes, bool] | None:
        """Add a video sample; answers (fragment, starts with a keyframe) when it closed one."""
        run = self._runs[self.video.track_id]
        done = None
        if run.samples and (
            sample.sync or sample.decode_time - self._started_at >= self._fragment_ticks
        ):
            done = self._cut(sample.decode_time)
        if not run.samples:
            self._started_at = sample.decode_time
        run.samples.append(sample)
        return done

    def add_audio(self, sample: Sample) -> None:
        if self.audio is None:
            return
        run = self._runs[self.audio.track_id]
        if run.samples:
            previous = run.samples[-1]
            previous.duration = max(sample.decode_time - previous.decode_time, 0)
            run.last_duration = previous.duration or run.last_duration
        run.samples.append(sample)

    def flush(self) -> tuple[bytes, bool] | None:
        """The fragment in progress, at the end of the stream."""
        run = self._runs[self.video.track_id]
        if not run.samples:
            return None
        end = run.samples[-1].decode_time + (run.last_duration or 1)
        return self._cut(end)

    def _cut(self, video_end: int) -> tuple[bytes, bool]:
        video_run = self._runs[self.video.track_id]
        samples = video_run.samples
        for earlier, later in itertools.pairwise(samples):
            earlier.duration = later.decode_time - earlier.decode_time
        samples[-1].duration = max(video_end - samples[-1].decode_time, 1)
        video_run.last_duration = samples[-1].duration
        runs: list[tuple[int, Sequence[Sample]]] = [(video_run.track_id, samples)]
        if self.audio is not None:
            audio_run = self._runs[self.audio.track_id]
            if audio_run.samples:
                audio_run.samples[-1].duration = audio_run.last_duration or self._audio_frame_ticks
                runs.append((audio_run.track_id, audio_run.samples))
        self._sequence += 1
        data = fragment(self._sequence, runs)
        keyframe = samples[0].sync
        for run in self._runs.values():
            run.samples = []
        return data, keyframe
