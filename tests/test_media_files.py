"""Media files on a real folder: own names only, retention from an index, durable renames,
salvaged clips (read back with ffprobe)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import av
import pytest

from tunnel_agent.media.backoff import Backoff
from tunnel_agent.media.files import (
    Retention,
    RetentionIndex,
    StreamFiles,
    scratch_path,
    temporary_path,
    write_atomically,
)
from tunnel_agent.media.settings import StreamSettings
from tunnel_agent.media.tasks.clip import MUXER_OPTIONS, ClipToFs, salvage_clip
from tunnel_agent.media.tasks.snapshot import SnapshotToFs

START = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def ffprobe(path: Path) -> dict[str, Any]:
    out = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-count_packets",
            "-show_format",
            "-show_streams",
            "-of",
            "json",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def h264_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ten seconds of H.264, a keyframe every second."""
    path = tmp_path_factory.mktemp("source") / "source.mkv"
    subprocess.run(
        [
            "ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=320x180:rate=15",
            "-t", "10", "-c:v", "libx264", "-g", "15", "-bf", "0", "-preset", "ultrafast",
            "-pix_fmt", "yuv420p", str(path),
        ],
        check=True,
        timeout=60,
    )  # fmt: skip
    return path


def snapshot_task(folder: Path, **limits: Any) -> SnapshotToFs:
    settings = StreamSettings(name="snaps", task="snapshot-to-fs", path=folder, **limits)
    return SnapshotToFs("lobby", settings, Backoff(1, 2, 60), folder)


def test_names_of_other_streams_and_foreign_files_are_not_own() -> None:
    mine, other = StreamFiles("door", "png"), StreamFiles("door-2", "png")
    name = mine.final_name(START, 1)
    assert mine.is_own(name) and not other.is_own(name)
    assert not mine.is_own(other.final_name(START, 1))
    for foreign in (
        "20260102T030405.000Z-000001.png",  # the names of earlier versions
        "door-20260102T030405.000Z-000001.png.bak",
        "door-20260102T030405.000Z-000001.jpg",
        "door-latest.png",
        "xdoor-20260102T030405.000Z-000001.png",
    ):
        assert not mine.is_own(foreign), foreign
    assert mine.is_own_temporary(temporary_path(Path(name)).name)
    assert mine.is_own_temporary(scratch_path(Path(name)).name)
    assert not mine.is_own_temporary(f".{name}")


def test_retention_deletes_only_the_streams_own_files(tmp_path: Path) -> None:
    task = snapshot_task(tmp_path, max_files=3)
    output = task.output
    foreign = [
        tmp_path / "notes.png",
        tmp_path / "20200101T000000.000Z-000001.png",
        tmp_path / StreamFiles("other", "png").final_name(START - timedelta(days=9), 1),
        tmp_path / ".important.png.partial",
    ]
    for path in foreign:
        path.write_bytes(b"keep me")
    old = [
        tmp_path / StreamFiles("snaps", "png").final_name(START + timedelta(seconds=i), 1)
        for i in range(5)
    ]
    for path in old:
        path.write_bytes(b"old")
    output.prepare()
    written = []
    for i in range(4):
        target = output.next_file(START + timedelta(hours=1, seconds=i))
        write_atomically(target, b"new image")
        output.published(target, 9, time.time())
        written.append(target)
    assert all(p.read_bytes() == b"keep me" for p in foreign)
    assert sorted(
        p.name for p in tmp_path.iterdir() if StreamFiles("snaps", "png").is_own(p.name)
    ) == [p.name for p in written[-3:]]
    assert task.counters["deleted_by_retention"] == 6
    assert ".important.png.partial" in os.listdir(tmp_path)  # not this stream's temporary


def test_retention_by_age_and_bytes_from_the_index(tmp_path: Path) -> None:
    files = StreamFiles("s", "bin")
    now = time.time()
    for i in range(6):
        path = tmp_path / files.final_name(START + timedelta(seconds=i), i)
        path.write_bytes(b"x" * 100)
        os.utime(path, (now - 100 + i * 10, now - 100 + i * 10))
    by_age = RetentionIndex(tmp_path, files, Retention(max_age_s=75))
    newest = tmp_path / files.final_name(START + timedelta(seconds=60), 99)
    newest.write_bytes(b"x" * 100)
    doomed = by_age.added(newest, 100, now)
    assert [d.path.name for d in doomed] == sorted(p.name for p in tmp_path.iterdir())[:3]
    by_bytes = RetentionIndex(tmp_path, files, Retention(max_bytes=250))
    assert len(by_bytes.added(newest, 100, now)) == 5 and by_bytes.total_bytes == 200


def test_no_limits_means_no_scan_and_no_index(tmp_path: Path) -> None:
    files = StreamFiles("s", "bin")
    index = RetentionIndex(tmp_path / "does-not-exist", files, Retention())
    assert index.added(tmp_path / "x", 1, time.time()) == []  # a scan would have raised
    assert index.count == 0


def test_the_index_is_kept_without_scanning_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = StreamFiles("s", "bin")
    for i in range(50):
        (tmp_path / files.final_name(START, i)).write_bytes(b"x")
    index = RetentionIndex(tmp_path, files, Retention(max_files=50))
    first = tmp_path / files.final_name(START + timedelta(seconds=1), 1)
    first.write_bytes(b"x")
    assert len(index.added(first, 1, time.time())) == 1
    scans = []
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda *a: scans.append(a) or real_scandir(*a))
    for i in range(20):
        index.added(
            tmp_path / files.final_name(START + timedelta(seconds=2 + i), 1), 1, time.time()
        )
    assert scans == [] and index.count == 50


def durable_steps(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Record fsync and rename calls, by the path they concern, and let them happen."""
    steps: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, Path.replace

    def fsync(descriptor: int) -> None:
        steps.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        real_fsync(descriptor)

    def replace(self: Path, target: Any) -> Path:
        steps.append(("rename", str(target)))
        return real_replace(self, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Path, "replace", replace)
    return steps


def test_snapshots_are_flushed_renamed_then_the_folder_flushed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps = durable_steps(monkeypatch)
    final = tmp_path / "a.png"
    write_atomically(final, b"image")
    assert steps == [
        ("fsync", str(temporary_path(final))),
        ("rename", str(final)),
        ("fsync", str(tmp_path)),
    ]
    assert final.read_bytes() == b"image"


def clip_settings(folder: Path, fmt: str, **extra: Any) -> StreamSettings:
    return StreamSettings(name="c", task="clip-to-fs", path=folder, format=fmt, duration=2, **extra)


def feed(task: ClipToFs, source: Path, seconds: float) -> None:
    """Hand the task the packets of ``source`` as the camera source would, in its thread."""
    from tunnel_agent.media.packets import MediaPacket, StreamTemplate

    with av.open(str(source)) as container:
        stream = container.streams.video[0]
        task.handle(StreamTemplate(stream, 1))
        for packet in container.demux(stream):
            if packet.dts is None:
                continue
            item = MediaPacket(
                data=bytes(packet),
                pts=packet.pts,
                dts=packet.dts,
                time_base=packet.time_base,
                is_keyframe=packet.is_keyframe,
                generation=1,
                captured_at=time.time(),
            )
            task.handle(item)
            if float(packet.dts * packet.time_base) >= seconds:
                break


def test_clips_are_flushed_renamed_then_the_folder_flushed(
    tmp_path: Path, h264_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = ClipToFs("lobby", clip_settings(tmp_path, "mkv"), Backoff(1, 2, 60), tmp_path)
    task.begin()
    steps = durable_steps(monkeypatch)
    feed(task, h264_file, 4.5)  # two complete clips of 2 s
    finals = sorted(tmp_path.glob("c-*.mkv"))
    assert len(finals) == 2
    for final in finals:
        at = steps.index(("rename", str(final)))
        assert steps[at - 1] == ("fsync", str(temporary_path(final)))
        assert steps[at + 1] == ("fsync", str(tmp_path))
        assert ffprobe(final)["streams"][0]["codec_name"] == "h264"
    task.reset()


def cut_short(task_folder: Path, source: Path, fmt: str, keep: float) -> Path:
    """A temporary clip as a crash leaves it: written progressively, then cut at ``keep``."""
    muxer, extension = StreamSettings.model_validate(
        {"name": "c", "task": "clip-to-fs", "path": "x", "format": fmt}
    ).clip_format
    final = task_folder / StreamFiles("c", extension).final_name(START, 7)
    partial = temporary_path(final)
    with (
        av.open(str(source)) as container,
        av.open(str(partial), "w", format=muxer, options=MUXER_OPTIONS.get(muxer, {})) as output,
    ):
        stream = container.streams.video[0]
        target: Any = output.add_stream_from_template(stream)
        for packet in container.demux(stream):
            if packet.dts is not None:
                packet.stream = target
                output.mux(packet)
    with partial.open("r+b") as handle:
        handle.truncate(int(partial.stat().st_size * keep))
    return partial


@pytest.mark.parametrize("fmt", ["mp4", "mkv", "ts", "mov"])
def test_a_clip_cut_short_is_salvaged_up_to_what_is_readable(
    tmp_path: Path, h264_file: Path, fmt: str
) -> None:
    partial = cut_short(tmp_path, h264_file, fmt, keep=0.6)
    final = tmp_path / partial.name[1 : -len(".partial")]
    kept = salvage_clip(partial, final, clip_settings(tmp_path, fmt).clip_format[0])
    assert kept > 15  # more than one keyframe interval of 15 packets
    assert not partial.exists() and not scratch_path(final).exists()
    info = ffprobe(final)
    (video,) = info["streams"]
    assert video["codec_name"] == "h264" and int(video["nb_read_packets"]) == kept
    assert 3.0 < float(info["format"]["duration"]) < 7.0


def test_a_partial_without_a_keyframe_is_removed_and_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    task = ClipToFs("lobby", clip_settings(tmp_path, "mkv"), Backoff(1, 2, 60), tmp_path)
    files = StreamFiles("c", "mkv")
    garbage = temporary_path(tmp_path / files.final_name(START, 1))
    garbage.write_bytes(os.urandom(50_000))
    empty = temporary_path(tmp_path / files.final_name(START, 2))
    empty.write_bytes(b"")
    interrupted = scratch_path(tmp_path / files.final_name(START, 3))
    interrupted.write_bytes(b"half a salvage")
    foreign = tmp_path / ".20260102T030405.000Z-000001.mkv.partial"
    foreign.write_bytes(b"not ours")
    with caplog.at_level("INFO", logger="tunnel_agent.media"):
        task.begin()
    assert sorted(os.listdir(tmp_path)) == [foreign.name]
    assert task.counters["partial_files_removed"] == 2
    removed = [r for r in caplog.records if r.getMessage() == "media.partial_clip_removed"]
    assert {r.fields["file"] for r in removed} == {garbage.name, empty.name}  # type: ignore[attr-defined]


def test_salvage_at_start_logs_the_clip_it_kept(
    tmp_path: Path, h264_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    partial = cut_short(tmp_path, h264_file, "mp4", keep=0.5)
    task = ClipToFs("lobby", clip_settings(tmp_path, "mp4"), Backoff(1, 2, 60), tmp_path)
    with caplog.at_level("INFO", logger="tunnel_agent.media"):
        task.begin()
    (final,) = tmp_path.iterdir()
    assert final.name == partial.name[1 : -len(".partial")]
    (record,) = [r for r in caplog.records if r.getMessage() == "media.partial_clip_salvaged"]
    assert record.fields["file"] == final.name  # type: ignore[attr-defined]
    assert task.counters["partial_clips_salvaged"] == 1
