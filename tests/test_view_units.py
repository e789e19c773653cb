"""The browser view's pure parts: fragmented MP4 writing, timestamps, the GOP cache and queues.

Clips are encoded here from synthetic frames (H.264, H.265, AAC) in Matroska (parameter sets in
the codec record, as a camera's SDP carries them) and MPEG-TS (parameter sets in-band); their
packets go out as RTP (``tests/support/rtp.py``) and come back through the relay's depacketisers
and remuxer, as from a camera. What the relay writes is read back with FFmpeg's own MP4 demuxer and
decoders (through PyAV).
"""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import av.container
import pytest

from tests.support.rtp import Packetizer
from tunnel_agent.cloud.relay.view import fanout, fmp4, pipe
from tunnel_agent.cloud.relay.view.boxes import (
    aac_codec_string,
    describe_init,
    hevc_codec_string,
)
from tunnel_agent.cloud.relay.view.fanout import GopCache, Offer, ViewerQueue
from tunnel_agent.cloud.relay.view.remux import AudioSetup, Remuxer, pick_audio, pick_video
from tunnel_agent.cloud.relay.view.segments import (
    CameraStreamError,
    Fragment,
    InitSegment,
    Keyframe,
)
from tunnel_agent.cloud.relay.view.snapshot import keyframe_to_jpeg
from tunnel_agent.rtsp.depacketize import (
    AacDepacketizer,
    H264Depacketizer,
    H265Depacketizer,
    VideoAccessUnit,
)
from tunnel_agent.rtsp.sdp import parse_sdp

FPS = 15
CAMERA_SPS = bytes.fromhex("6742c016da0280bfe5c05a8303035280000003008000000f478b1750")
GOP = 5


def make_clip(
    path: Path, video_codec: str, *, audio: bool, frames: int = 20, container: str = "matroska"
) -> None:
    """A small file with ``frames`` frames, a keyframe every ``GOP``, optionally AAC audio."""
    with av.open(str(path), "w", format=container) as out:
        video = out.add_stream(video_codec, rate=FPS)
        video.width, video.height, video.pix_fmt = 320, 240, "yuv420p"
        video.options = (
            {"g": str(GOP), "bf": "0"}
            if video_codec == "libx264"
            else {"x265-params": f"keyint={GOP}:min-keyint={GOP}:bframes=0:log-level=error"}
        )
        sound = out.add_stream("aac", rate=48000) if audio else None
        samples = 0
        for index in range(frames):
            frame = grey_frame(320, 240, (index * 12) % 256)
            frame.pts = index
            frame.time_base = Fraction(1, FPS)
            out.mux(video.encode(frame))
            if sound is not None:
                while samples < (index + 1) * 48000 // FPS:
                    chunk = av.AudioFrame(format="fltp", layout="mono", samples=1024)
                    chunk.planes[0].update(bytes(chunk.planes[0].buffer_size))
                    chunk.sample_rate = 48000
                    chunk.pts = samples
                    samples += 1024
                    out.mux(sound.encode(chunk))
        out.mux(video.encode(None))
        if sound is not None:
            out.mux(sound.encode(None))


def grey_frame(width: int, height: int, level: int, pix_fmt: str = "yuv420p") -> av.VideoFrame:
    frame = av.VideoFrame(width, height, pix_fmt)
    for index, plane in enumerate(frame.planes):
        plane.update(bytes([level if index == 0 else 128]) * plane.buffer_size)
    return frame


class Collect:
    def __init__(self) -> None:
        self.inits: list[InitSegment] = []
        self.fragments: list[Fragment] = []
        self.keyframes: list[Keyframe] = []

    def on_init(self, init: InitSegment) -> None:
        self.inits.append(init)

    def on_fragment(self, fragment: Fragment) -> None:
        self.fragments.append(fragment)

    def on_keyframe(self, keyframe: Keyframe) -> None:
        self.keyframes.append(keyframe)


def split_annexb(data: bytes) -> list[bytes]:
    """The NAL units of an Annex B byte stream (start codes and trailing zeros dropped)."""
    return [u.rstrip(b"\x00") for u in data.split(b"\x00\x00\x01") if u.rstrip(b"\x00")]


def record_parameter_sets(extradata: bytes, hevc: bool) -> list[bytes]:
    """The parameter sets in an avcC / hvcC record (what a camera puts in its SDP)."""
    units: list[bytes] = []
    if not hevc:
        offset, count = 6, extradata[5] & 0x1F
        for table in range(2):
            for _ in range(count):
                size = int.from_bytes(extradata[offset : offset + 2], "big")
                units.append(extradata[offset + 2 : offset + 2 + size])
                offset += 2 + size
            if table == 0:
                count, offset = extradata[offset], offset + 1
        return units
    offset, arrays = 23, extradata[22]
    for _ in range(arrays):
        count = int.from_bytes(extradata[offset + 1 : offset + 3], "big")
        offset += 3
        for _ in range(count):
            size = int.from_bytes(extradata[offset : offset + 2], "big")
            units.append(extradata[offset + 2 : offset + 2 + size])
            offset += 2 + size
    return units


def remux_file(path: Path) -> Collect:
    """A file's packets as a camera sends them (RTP, video at 90 kHz, AAC at 48 kHz), through the
    depacketisers into the remuxer, as the relay reads a camera."""
    sink = Collect()
    with av.open(str(path)) as source:
        video = source.streams.video[0]
        audio = next(iter(source.streams.audio), None)
        hevc = video.codec_context.name == "hevc"
        extradata = bytes(video.codec_context.extradata or b"")
        record = extradata[:1] == b"\x01"
        audio_setup = None
        if audio is not None:
            asc = bytes(audio.codec_context.extradata or b"")
            audio_setup = AudioSetup(48000, asc, audio.codec_context.channels)
        remuxer = Remuxer("hevc" if hevc else "h264", 90000, audio_setup, sink, 7)
        sets = record_parameter_sets(extradata, hevc) if record else []
        depacketizer = (H265Depacketizer if hevc else H264Depacketizer)(remuxer.on_video, sets)
        remuxer.parameter_sets = depacketizer.parameter_sets
        aac = AacDepacketizer(remuxer.on_audio)
        for depacketizer_of_stream in (depacketizer, aac):
            depacketizer_of_stream.set_reference(0)  # as RTP-Info does: both clocks at one instant
        video_rtp, audio_rtp = Packetizer(), Packetizer(payload_type=97, sequence=9000)
        for packet in source.demux():
            if not packet.size or packet.pts is None:
                continue
            data = bytes(packet)
            seconds = packet.pts * packet.time_base
            if packet.stream is video:
                units = fmp4_units(data) if record else split_annexb(data)
                for rtp in video_rtp.video(units, int(seconds * 90000), hevc=hevc):
                    depacketizer.push(rtp)
            elif audio is not None and packet.stream is audio:
                timestamp = round(seconds * 48000 / 1024) * 1024
                aac.push(audio_rtp.aac([data], timestamp))
        remuxer.flush()
    return sink


def fmp4_units(data: bytes) -> list[bytes]:
    units, offset = [], 0
    while offset + 4 <= len(data):
        size = int.from_bytes(data[offset : offset + 4], "big")
        units.append(data[offset + 4 : offset + 4 + size])
        offset += 4 + size
    return units


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("clips")
    made = {
        "h264": folder / "h264.mkv",
        "h264+aac": folder / "h264-aac.mkv",
        "h265": folder / "h265.mkv",
        "h264 annexb": folder / "h264.ts",
        "h265 annexb": folder / "h265.ts",
    }
    make_clip(made["h264"], "libx264", audio=False)
    make_clip(made["h264+aac"], "libx264", audio=True)
    make_clip(made["h265"], "libx265", audio=False)
    make_clip(made["h264 annexb"], "libx264", audio=False, container="mpegts")
    make_clip(made["h265 annexb"], "libx265", audio=False, container="mpegts")
    return made


@dataclass(frozen=True)
class Read:
    kind: str  # "video" or "audio"
    data: bytes
    keyframe: bool
    dts_s: float
    duration: int


def read_packets(container: av.container.InputContainer, kind: str | None = None) -> list[Read]:
    streams = [s for s in container.streams if kind is None or s.type == kind]
    return [
        Read(p.stream.type, bytes(p), p.is_keyframe, float(p.dts * p.time_base), p.duration or 0)
        for p in container.demux(*streams)
        if p.size
    ]


def read_back(sink: Collect) -> list[Read]:
    """The relay's output as FFmpeg's MP4 demuxer reads it: init segment, then every fragment."""
    data = sink.inits[0].data + b"".join(f.data for f in sink.fragments)
    with av.open(io.BytesIO(data), "r", format="mp4") as container:
        return read_packets(container)


def source_packets(path: Path, kind: str) -> list[Read]:
    with av.open(str(path)) as container:
        return read_packets(container, kind)


def decoded_frames(path: Path, sink: Collect) -> int:
    """Frames FFmpeg decodes from the relay's output: the sample entry and samples are right."""
    data = sink.inits[0].data + b"".join(f.data for f in sink.fragments)
    with av.open(io.BytesIO(data), "r", format="mp4") as container:
        frames = list(container.decode(video=0))
    assert all((f.width, f.height) == (320, 240) for f in frames)
    return len(frames)


def test_h264_remux_gives_one_init_then_fragments_cut_at_keyframes(
    clips: dict[str, Path],
) -> None:
    sink = remux_file(clips["h264"])

    assert len(sink.inits) == 1
    init = sink.inits[0]
    assert init.generation == 7 and init.video_codec == "h264"
    assert init.data[4:8] == b"ftyp"
    video = init.info.video
    assert video is not None and (video.width, video.height) == (320, 240)
    assert video.codec.startswith("avc1.64")  # High profile, as libx264 encodes by default
    assert init.info.mime_type == f'video/mp4; codecs="{video.codec}"'
    # 15 fps, a keyframe every 5 frames, a fragment every 0.1 s: frames 2 + 2 + 1 per GOP.
    assert len(sink.fragments) == 12
    assert all(f.data[4:8] == b"moof" for f in sink.fragments)
    assert [i for i, f in enumerate(sink.fragments) if f.keyframe] == [0, 3, 6, 9]
    assert len(sink.keyframes) == 4 and sink.keyframes[-1].sequence == 4


def test_aac_is_passed_through_beside_the_video(clips: dict[str, Path]) -> None:
    sink = remux_file(clips["h264+aac"])

    tracks = sink.inits[0].info.tracks
    assert [t.handler for t in tracks] == ["vide", "soun"]
    assert tracks[1].codec == "mp4a.40.2"
    assert sink.fragments[0].keyframe


def test_h265_is_tagged_hvc1_with_its_rfc6381_string(clips: dict[str, Path]) -> None:
    sink = remux_file(clips["h265"])

    video = sink.inits[0].info.video
    assert video is not None
    assert video.codec.startswith("hvc1.1.6.L")  # Main profile, compatibility flags 1 and 2
    assert sink.inits[0].video_codec == "hevc"
    assert [i for i, f in enumerate(sink.fragments) if f.keyframe][:2] == [0, 3]


def test_a_stream_without_playable_video_is_refused_with_a_reason() -> None:
    mjpeg = parse_sdp("v=0\r\nm=video 0 RTP/AVP 26\r\na=rtpmap:26 JPEG/90000\r\n")
    with pytest.raises(CameraStreamError, match=r"JPEG video; browsers play H\.264 or H\.265"):
        pick_video(mjpeg)
    audio_only = parse_sdp("v=0\r\nm=audio 0 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")
    with pytest.raises(CameraStreamError, match="no video"):
        pick_video(audio_only)
    assert pick_audio(audio_only) is None  # G.711 is not passed on; AAC is


def test_video_whose_timestamp_goes_back_is_dropped_and_needs_parameter_sets() -> None:
    sink = Collect()
    remuxer = Remuxer("h264", 90000, None, sink, 1)
    with pytest.raises(CameraStreamError, match="no SPS/PPS"):
        remuxer.on_video(VideoAccessUnit([b"\x65\x88"], 0, True))
    remuxer.parameter_sets = {7: CAMERA_SPS, 8: b"\x68\xce\x3c\x80"}
    for timestamp, keyframe in ((0, True), (6000, False), (3000, False), (12000, False)):
        remuxer.on_video(VideoAccessUnit([b"\x65" if keyframe else b"\x41"], timestamp, keyframe))
    remuxer.flush()
    video = sink.inits[0].info.video
    assert video is not None and (video.width, video.height) == (640, 360)
    data = sink.inits[0].data + b"".join(f.data for f in sink.fragments)
    with av.open(io.BytesIO(data), "r", format="mp4") as container:
        assert [p.dts for p in container.demux() if p.size] == [0, 6000, 12000]


def test_snapshot_decodes_a_keyframe_alone(clips: dict[str, Path]) -> None:
    keyframe = remux_file(clips["h264"]).keyframes[-1]

    jpeg, width, height = keyframe_to_jpeg(keyframe)

    assert jpeg[:3] == b"\xff\xd8\xff" and (width, height) == (320, 240)


def test_fragments_read_back_as_the_packets_they_were_made_of(clips: dict[str, Path]) -> None:
    sink = remux_file(clips["h264+aac"])
    back = read_back(sink)
    video = [p for p in back if p.kind == "video"]
    audio = [p for p in back if p.kind == "audio"]
    source_video = source_packets(clips["h264+aac"], "video")
    source_audio = source_packets(clips["h264+aac"], "audio")

    assert [p.data for p in video] == [p.data for p in source_video]
    assert [p.keyframe for p in video] == [p.keyframe for p in source_video]
    # Audio from before the first keyframe (the encoder's priming frame) has no picture.
    start_s = source_video[0].dts_s
    assert [p.data for p in audio] == [p.data for p in source_audio if p.dts_s >= start_s]
    assert len(audio) >= len(source_audio) - 1
    times = [p.dts_s for p in video]
    assert times == sorted(times) and times[0] == 0.0
    assert abs(times[-1] - 19 / FPS) < 0.002  # durations add up to the source's timing
    audio_end = audio[-1].dts_s
    assert abs(audio_end - times[-1]) < 0.1  # audio and video stay together


@pytest.mark.parametrize("clip", ["h264", "h265", "h264 annexb", "h265 annexb"])
def test_every_frame_decodes_from_the_fragments(clips: dict[str, Path], clip: str) -> None:
    sink = remux_file(clips[clip])

    assert decoded_frames(clips[clip], sink) == 20
    video = sink.inits[0].info.video
    assert video is not None and (video.width, video.height) == (320, 240)
    assert [i for i, f in enumerate(sink.fragments) if f.keyframe] == [0, 3, 6, 9]


def test_annexb_video_gets_its_configuration_record_from_the_parameter_sets(
    clips: dict[str, Path],
) -> None:
    h264 = remux_file(clips["h264 annexb"]).inits[0]
    h265 = remux_file(clips["h265 annexb"]).inits[0]
    from_record = remux_file(clips["h264"]).inits[0]

    assert h264.info.mime_type == from_record.info.mime_type  # same encoder settings
    h265_video = h265.info.video
    assert h265_video is not None and h265_video.codec.startswith("hvc1.1.6.L")


def test_length_prefixed_samples() -> None:
    assert (
        fmp4.length_prefixed([b"\x65\x88", b"\x06"])
        == b"\x00\x00\x00\x02\x65\x88\x00\x00\x00\x01\x06"
    )


def test_fragmenter_cuts_at_keyframes_and_every_tenth_of_a_second() -> None:
    video = fmp4.VideoTrack("h264", 320, 240, 90000, fmp4.avcc([b"\x67\x42\x00\x1e"], [b"\x68"]))
    fragmenter = fmp4.Fragmenter(video, None, 0.1)
    frame_ticks = 3600  # 25 fps
    cuts = []
    for index in range(10):
        sample = fmp4.Sample(bytes([index]) * 10, index * frame_ticks, 0, index in (0, 7))
        cuts.append(fragmenter.add_video(sample))
    cuts.append(fragmenter.flush())

    done = [(i, cut[1]) for i, cut in enumerate(cuts) if cut is not None]
    # 0.1 s = 2.5 frames: frames 0-2, 3-5, 6, then the keyframe 7 starts one, flushed at the end
    assert done == [(3, True), (6, False), (7, False), (10, True)]
    last = cuts[10]
    assert last is not None
    with av.open(io.BytesIO(fmp4.init_segment([video]) + last[0]), "r", format="mp4") as back:
        packets = read_packets(back)
    assert [p.duration for p in packets] == [frame_ticks] * 3  # the last one repeats its previous


def test_hevc_codec_string_follows_the_spec_examples() -> None:
    # ISO/IEC 14496-15 E.3: Main profile, Main tier, level 3.1, progressive source flag only.
    hvcc = bytes([1, 0x01, 0x60, 0, 0, 0, 0x90, 0, 0, 0, 0, 0, 93]) + bytes(10)
    assert hevc_codec_string("hvc1", hvcc) == "hvc1.1.6.L93.90"
    # High tier, Main 10, level 5.1, no constraint flags.
    hvcc = bytes([1, 0x22, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 153]) + bytes(10)
    assert hevc_codec_string("hev1", hvcc) == "hev1.2.4.H153"


def test_aac_codec_string_reads_the_audio_object_type() -> None:
    he_aac = bytes(4) + bytes([0x03, 0x19, 0, 1, 0, 0x04, 0x11, 0x40]) + bytes(12)
    he_aac += bytes([0x05, 0x02, 0x2B, 0x92])  # object type 5 (SBR)
    assert aac_codec_string(he_aac) == "mp4a.40.5"


def init_segment(generation: int = 1) -> InitSegment:
    return InitSegment(b"INIT", describe_init(_empty_moov()), generation, "h264")


def _empty_moov() -> bytes:
    return (8).to_bytes(4, "big") + b"moov"


def frag(keyframe: bool, size: int = 100, generation: int = 1) -> Fragment:
    return Fragment(bytes(size), keyframe, generation, 0.0)


def drain(queue: ViewerQueue) -> list[bytes | str]:
    items: list[bytes | str] = []
    while (item := queue.pop()) is not None:
        items.append(item)
    return items


def test_gop_cache_keeps_the_fragments_since_the_last_keyframe() -> None:
    cache = GopCache(max_bytes=1000)
    cache.on_init(init_segment())
    cache.on_fragment(frag(False))  # before any keyframe: useless to a new viewer
    assert cache.start() == []
    first = [frag(True), frag(False), frag(False)]
    for fragment in first:
        cache.on_fragment(fragment)
    assert cache.start() == first
    cache.on_fragment(second := frag(True))
    assert cache.start() == [second]
    for _ in range(10):  # a GOP larger than the cache: dropped, late joiners wait
        cache.on_fragment(frag(False))
    assert cache.start() == []
    cache.on_fragment(frag(True, generation=2))  # another connection's fragment
    assert cache.start() == []


def test_viewer_queue_starts_with_the_announcement_and_init_then_a_keyframe() -> None:
    queue = ViewerQueue(max_bytes=1000)
    queue.start(init_segment(), [], "ANNOUNCE")
    assert queue.offer(frag(False), 0) is Offer.SKIPPED
    assert queue.offer(key := frag(True), 0) is Offer.QUEUED
    queue.set_status("S1")
    queue.set_status("S2")  # only the latest status is kept
    assert drain(queue) == ["ANNOUNCE", b"INIT", "S2", key.data]


def test_a_slow_viewer_skips_to_the_next_keyframe_and_is_dropped_if_it_stays_slow() -> None:
    queue = ViewerQueue(max_bytes=350, overflows_to_disconnect=3, overflow_window_s=30)
    queue.start(init_segment(), [], "A")
    for fragment in (frag(True), frag(False), frag(False)):
        assert queue.offer(fragment, 0) is Offer.QUEUED
    assert queue.offer(frag(False), 1) is Offer.OVERFLOWED
    assert queue.queued_bytes == 0 and queue.waiting_for_keyframe
    assert queue.offer(frag(False), 1) is Offer.SKIPPED
    assert drain(queue) == ["A", b"INIT"]  # the init segment is never dropped
    assert queue.offer(frag(True), 2) is Offer.QUEUED
    for _ in range(3):
        queue.offer(frag(False), 2)
    assert queue.waiting_for_keyframe  # second overflow
    assert queue.offer(frag(True), 3) is Offer.QUEUED
    queue.offer(frag(False), 3)
    queue.offer(frag(False), 3)
    assert queue.offer(frag(False), 3) is Offer.DISCONNECT  # third overflow within the window
    assert queue.fragments_dropped > 0 and queue.fragments_skipped == 1


def test_queued_fragments_leave_as_one_message_up_to_a_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fanout, "MAX_MESSAGE_BYTES", 250)
    queue = ViewerQueue(max_bytes=1000)
    gop = [frag(True, 100), frag(False, 100), frag(False, 100)]
    queue.start(init_segment(), gop, "A")
    queue.offer(late := frag(False, 100), 0)

    assert drain(queue) == ["A", b"INIT", gop[0].data + gop[1].data, gop[2].data + late.data]
    assert queue.queued_bytes == 0 and len(queue) == 0


def test_overflows_outside_the_window_are_forgiven() -> None:
    queue = ViewerQueue(max_bytes=150, overflows_to_disconnect=2, overflow_window_s=10)
    queue.start(init_segment(), [], "A")
    queue.offer(frag(True), 0)
    assert queue.offer(frag(True), 0) is Offer.OVERFLOWED
    assert queue.offer(frag(True), 20) is Offer.OVERFLOWED  # the first one is 20 s old
    assert queue.offer(frag(True), 21) is Offer.DISCONNECT


def test_a_new_generation_restarts_the_viewer_from_its_init() -> None:
    queue = ViewerQueue(max_bytes=1000)
    queue.start(init_segment(1), [], "A1")
    queue.offer(frag(True), 0)
    queue.start(init_segment(2), [], "A2")
    assert queue.offer(frag(True, generation=1), 0) is Offer.SKIPPED  # a late old fragment
    queue.offer(new := frag(True, generation=2), 0)
    assert drain(queue) == ["A2", b"INIT", new.data]


class Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.lost = asyncio.Event()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()


async def test_a_pipe_delivers_in_order_holds_writes_while_paused_and_closes_both_sides() -> None:
    near, client = Recorder(), Recorder()
    near_transport, client_transport = pipe.join(near, client)

    near_transport.write(b"to client")
    near_transport.pause_reading()
    client_transport.write(b"one")
    client_transport.write(memoryview(b"two"))
    assert client.received == [b"to client"] and near.received == []
    near_transport.resume_reading()
    client_transport.write(b"three")  # after the held ones, not before
    async with asyncio.timeout(5):
        while len(near.received) < 3:
            await asyncio.sleep(0)
    assert near.received == [b"one", b"two", b"three"]

    client_transport.close()
    async with asyncio.timeout(5):
        await near.lost.wait()
        await client.lost.wait()
    assert near_transport.is_closing() and client_transport.is_closing()
    near_transport.write(b"gone")
    assert client.received == [b"to client"]
