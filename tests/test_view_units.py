"""The browser view's pure parts: MP4 box reading, timestamps, the GOP cache and viewer queues.

The MP4 bytes come from FFmpeg's own muxer (through PyAV), encoded here from synthetic frames, so
the parser is checked against what the relay really emits: H.264, H.265 and AAC.
"""

from __future__ import annotations

import threading
from fractions import Fraction
from pathlib import Path

import av
import pytest

from tunnel_agent.cloud.relay.view import fanout
from tunnel_agent.cloud.relay.view.boxes import (
    BoxSplitter,
    aac_codec_string,
    describe_init,
    fragment_starts_with_sync,
    hevc_codec_string,
)
from tunnel_agent.cloud.relay.view.fanout import GopCache, Offer, ViewerQueue
from tunnel_agent.cloud.relay.view.remux import remux, usable_dts
from tunnel_agent.cloud.relay.view.segments import (
    CameraStreamError,
    Fragment,
    InitSegment,
    Keyframe,
)
from tunnel_agent.cloud.relay.view.snapshot import keyframe_to_jpeg

FPS = 15
GOP = 5


def make_clip(path: Path, video_codec: str, *, audio: bool, frames: int = 20) -> None:
    """A small file with ``frames`` frames, a keyframe every ``GOP``, optionally AAC audio."""
    with av.open(str(path), "w", format="matroska") as out:
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


def remux_file(path: Path) -> Collect:
    sink = Collect()
    remux(str(path), sink, threading.Event(), 7, open_timeout_s=5, read_timeout_s=5)
    return sink


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("clips")
    made = {
        "h264": folder / "h264.mkv",
        "h264+aac": folder / "h264-aac.mkv",
        "h265": folder / "h265.mkv",
    }
    make_clip(made["h264"], "libx264", audio=False)
    make_clip(made["h264+aac"], "libx264", audio=True)
    make_clip(made["h265"], "libx265", audio=False)
    return made


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


def test_a_stream_without_playable_video_is_refused_with_a_reason(tmp_path: Path) -> None:
    path = tmp_path / "mjpeg.mkv"
    with av.open(str(path), "w", format="matroska") as out:
        stream = out.add_stream("mjpeg", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuvj420p"
        out.mux(stream.encode(grey_frame(64, 48, 0, "yuvj420p")))
        out.mux(stream.encode(None))

    with pytest.raises(CameraStreamError, match=r"mjpeg video; browsers play H\.264 or H\.265"):
        remux_file(path)


def test_snapshot_decodes_a_keyframe_alone(clips: dict[str, Path]) -> None:
    keyframe = remux_file(clips["h264"]).keyframes[-1]

    jpeg, width, height = keyframe_to_jpeg(keyframe)

    assert jpeg[:3] == b"\xff\xd8\xff" and (width, height) == (320, 240)


def test_box_splitter_reassembles_boxes_fed_a_byte_at_a_time(clips: dict[str, Path]) -> None:
    sink = remux_file(clips["h264"])
    stream = sink.inits[0].data + b"".join(f.data for f in sink.fragments[:3])
    splitter = BoxSplitter()

    boxes = [box for i in range(len(stream)) for box in splitter.feed(stream[i : i + 1])]

    assert [kind for kind, _ in boxes] == [b"ftyp", b"moov"] + [b"moof", b"mdat"] * 3
    assert b"".join(box for _, box in boxes) == stream
    assert splitter.pending_bytes == 0


def test_moov_and_moof_reading(clips: dict[str, Path]) -> None:
    sink = remux_file(clips["h264"])
    moov = sink.inits[0].data[sink.inits[0].data.index(b"moov") - 4 :]
    info = describe_init(moov)
    assert info.video is not None
    track = info.video.track_id
    moofs = [f.data[: int.from_bytes(f.data[:4], "big")] for f in sink.fragments]

    assert [fragment_starts_with_sync(m, track) for m in moofs[:4]] == [True, False, False, True]
    assert not fragment_starts_with_sync(moofs[0], track + 1)  # not the video track


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


@pytest.mark.parametrize(
    ("dts", "pts", "last", "expected"),
    [
        (None, None, None, 0),  # the keyframe right after PLAY: first packet, no timestamps
        (None, 6000, 0, 6000),  # PTS only: used as DTS
        (12000, 12000, 6000, 12000),
        (6000, 6000, 6000, None),  # not increasing: dropped
        (None, None, 6000, None),  # no timestamp later on: dropped
        (3000, 9000, 6000, None),  # going backwards: dropped
    ],
)
def test_usable_dts(
    dts: int | None, pts: int | None, last: int | None, expected: int | None
) -> None:
    assert usable_dts(dts, pts, last) == expected


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


def test_a_camera_that_never_answers_fails_within_the_timeout() -> None:
    import socket
    import time

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(av.error.FFmpegError):
            remux(
                f"rtsp://127.0.0.1:{port}/silent",
                Collect(),
                threading.Event(),
                1,
                open_timeout_s=1.0,
                read_timeout_s=1.0,
            )
        assert time.monotonic() - started < 5.0
