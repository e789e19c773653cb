"""The camera source's packet path with real files and PyAV: B-frames, loops, what is decoded."""

from __future__ import annotations

import math
import subprocess
import time
from pathlib import Path

import av
import pytest

from tunnel_agent.media.backoff import Backoff
from tunnel_agent.media.pacing import backfill_dts, forward_dts
from tunnel_agent.media.packets import CapturedFrame, MediaPacket, StreamTemplate
from tunnel_agent.media.settings import MediaSettings, StreamSettings
from tunnel_agent.media.source import CameraSource
from tunnel_agent.media.tasks.base import FrameTask, PacketTask
from tunnel_agent.media.urls import parse_source

FPS, FRAMES, GOP = 25, 25, 10  # one second per loop, keyframes at frames 0, 10 and 20
LOOPS = 3


def b_frame_file(folder: Path, extension: str) -> Path:
    """A short H.264 file with two B-frames between references (x264 through ffmpeg)."""
    path = folder / f"b-frames.{extension}"
    subprocess.run(
        [
            "ffmpeg", "-nostdin", "-loglevel", "error", "-y",
            "-f", "lavfi", "-i", f"testsrc=size=320x240:rate={FPS}",
            "-frames:v", str(FRAMES), "-c:v", "libx264", "-bf", "2", "-g", str(GOP),
            "-pix_fmt", "yuv420p", str(path),
        ],
        check=True,
        timeout=60,
    )  # fmt: skip
    return path


def file_packets(path: Path) -> list[tuple[bytes, int | None, int | None, bool]]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [(bytes(p), p.pts, p.dts, p.is_keyframe) for p in container.demux(stream) if p.size]


def backoff() -> Backoff:
    return Backoff(1.0, 2.0, 60.0)


class Recorder(PacketTask):
    """Keeps every packet and template it is given."""

    queue_size = 4096

    def __init__(self) -> None:
        settings = StreamSettings(
            name="rec", task="stream-to-rtsp", media_server_address="127.0.0.1"
        )
        super().__init__("cam", settings, backoff())
        self.packets: list[MediaPacket] = []
        self.templates: list[StreamTemplate] = []

    def handle(self, item: MediaPacket | StreamTemplate) -> None:
        if isinstance(item, StreamTemplate):
            self.templates.append(item)
        else:
            self.packets.append(item)


class FrameCounter(FrameTask):
    queue_size = 4096

    def __init__(self, rate_per_s: float) -> None:
        settings = StreamSettings(
            name="snap", task="snapshot-to-fs", path="snaps", snapshots_per_second=rate_per_s
        )
        super().__init__("cam", settings, backoff())
        self.frames: list[CapturedFrame] = []

    def handle(self, item: CapturedFrame) -> None:
        self.frames.append(item)


def run_source(
    path: Path, packet_tasks: list[PacketTask], frame_tasks: list[FrameTask], enough: object
) -> CameraSource:
    source = CameraSource("cam", parse_source(f"file://{path}"), MediaSettings(), packet_tasks,
                          frame_tasks)  # fmt: skip
    tasks = [*packet_tasks, *frame_tasks]
    for task in tasks:
        task.start()
    source.start()
    try:
        deadline = time.monotonic() + 30
        while not enough():  # type: ignore[operator]
            assert time.monotonic() < deadline, f"source: {source.status()}"
            time.sleep(0.05)
    finally:
        source.stop()
        for task in tasks:
            task.stop()
    return source


@pytest.mark.parametrize("extension", ["mkv", "mp4"])
def test_a_b_frame_file_keeps_every_packet_and_frame_across_loops(
    tmp_path: Path, extension: str
) -> None:
    path = b_frame_file(tmp_path, extension)
    reference = file_packets(path)
    assert len(reference) == FRAMES
    assert any(dts is None for _, _, dts, _ in reference) or reference[0][2] < 0  # the hard case
    recorder, counter = Recorder(), FrameCounter(0)  # rate 0: every frame
    source = run_source(path, [recorder], [counter], lambda: len(counter.frames) >= LOOPS * FRAMES)

    looped = recorder.packets[: LOOPS * FRAMES]
    assert [p.data for p in looped] == [data for data, *_ in reference] * LOOPS
    assert [p.is_keyframe for p in looped] == [key for *_, key in reference] * LOOPS
    dts = [p.dts for p in looped]
    assert dts == sorted(set(dts)), "DTS must strictly increase across loops"
    assert all(p.pts is not None and p.pts >= p.dts for p in looped)
    # Each loop is the file shifted by one constant: presentation order is kept.
    for loop in range(LOOPS):
        shifts = {
            p.pts - pts  # type: ignore[operator]
            for p, (_, pts, _, _) in zip(looped[loop * FRAMES :], reference, strict=False)
        }
        assert len(shifts) == 1, (loop, shifts)
    assert len(recorder.templates) == 1  # one timeline for all loops
    assert source.counters["packets_dropped_bad_timestamps"] == 0
    # Every frame of every loop was decoded and delivered, none held back.
    assert len(counter.frames) >= LOOPS * FRAMES
    assert source.counters["frames_decoded"] >= LOOPS * FRAMES


def test_snapshots_decode_only_up_to_the_frame_that_falls_due(tmp_path: Path) -> None:
    """At 1 snapshot/s with a keyframe every 2 s, the frames after the one that falls due are
    never decoded."""
    path = tmp_path / "long-gop.mkv"
    subprocess.run(
        [
            "ffmpeg", "-nostdin", "-loglevel", "error", "-y",
            "-f", "lavfi", "-i", f"testsrc=size=320x240:rate={FPS}",
            "-frames:v", str(2 * FPS), "-c:v", "libx264", "-bf", "0", "-g", str(2 * FPS),
            "-pix_fmt", "yuv420p", str(path),
        ],
        check=True,
        timeout=60,
    )  # fmt: skip
    counter = FrameCounter(1.0)  # one keyframe every 2 s: keyframes alone do not suffice
    source = run_source(path, [], [counter], lambda: len(counter.frames) >= 6)
    decoded, packets = source.counters["frames_decoded"], source.counters["packets"]
    assert not source.keyframes_only
    # Per 2-s group: the keyframe, then frames 1-25 for the snapshot at 1 s; 26-49 never.
    groups = math.ceil(packets / (2 * FPS))
    assert decoded <= groups * (FPS + 3) and decoded < packets * 0.7, (decoded, packets)
    assert decoded >= len(counter.frames)


def test_a_snapshot_due_just_before_a_keyframe_is_taken_from_it(tmp_path: Path) -> None:
    """1/s from 50 fps with a keyframe every 2 s from frame 103: every other snapshot falls due
    3 frames before a keyframe. Taken from that keyframe (0.06 s late, within the pacer's 0.1 s),
    the frames before it are never decoded: a keyframe and 47 frames per 2 s once the keyframe
    interval is known, not 97."""
    path, fps, frames = tmp_path / "late-keyframes.mkv", 50, 700  # the run ends before a loop
    keyframes = "+".join(f"eq(n,{n})" for n in (0, *range(103, frames, 100)))
    subprocess.run(
        [
            "ffmpeg", "-nostdin", "-loglevel", "error", "-y",
            "-f", "lavfi", "-i", f"testsrc=size=320x240:rate={fps}",
            "-frames:v", str(frames), "-c:v", "libx264", "-bf", "0", "-g", "1000",
            "-sc_threshold", "0", "-force_key_frames", f"expr:{keyframes}",
            "-pix_fmt", "yuv420p", str(path),
        ],
        check=True,
        timeout=60,
    )  # fmt: skip
    assert [key for *_, key in file_packets(path)].count(True) == 7
    counter = FrameCounter(1.0)
    source = run_source(path, [], [counter], lambda: len(counter.frames) >= 13)
    decoded, packets = source.counters["frames_decoded"], source.counters["packets"]
    assert not source.keyframes_only and packets < frames
    # About 390 of 600: up to 4 s every due frame is decoded (the keyframe interval is known
    # from the second interval on), then half of each group. Decoding up to each frame that falls
    # due would be ~590; the bound leaves room for a keyframe a loaded machine delivers too late.
    assert decoded <= 0.75 * packets, (decoded, packets)
    assert len(counter.frames) >= math.floor(packets / fps) - 1, (len(counter.frames), packets)


def test_keyframes_alone_when_they_suffice_also_with_b_frames(tmp_path: Path) -> None:
    path = b_frame_file(tmp_path, "mkv")
    counter = FrameCounter(2.0)  # 2/s, a keyframe every 0.4 s: keyframes suffice
    source = run_source(path, [], [counter], lambda: len(counter.frames) >= 6)
    assert source.keyframes_only
    # Only keyframes once the keyframe rate is known (two of them), each one coming out at once.
    assert source.counters["frames_decoded"] <= source.counters["packets"] / 2
    assert len(counter.frames) >= 6


def test_missing_dts_is_filled_below_the_next_known_one() -> None:
    assert backfill_dts(2, 0, None, 40) == [-80, -40]
    assert backfill_dts(2, 4000, 3880, 40) == [3920, 3960]
    assert backfill_dts(2, 100, 90, 40) == [93, 96]  # squeezed above the last DTS
    assert backfill_dts(3, 100, 98, 40) == [None, None, 99]  # what cannot fit is dropped
    assert backfill_dts(2, 100, 150, 40) == [None, None]
    assert backfill_dts(0, 100, 99, 40) == []
    assert forward_dts(3, None, 7, 40) == [7, 47, 87]
    assert forward_dts(2, 10, 0, 5) == [15, 20]
