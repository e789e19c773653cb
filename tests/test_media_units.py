"""The media connector's pure pieces: configuration, URLs, pacing, naming, retention, backoff."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.support import toml_writer
from tunnel_agent.config.loading import ConfigError, load_settings
from tunnel_agent.media.backoff import Backoff
from tunnel_agent.media.files import StreamFiles, temporary_path
from tunnel_agent.media.pacing import (
    KeyframeRate,
    SnapshotPacer,
    TimestampValidator,
    keyframes_suffice,
)
from tunnel_agent.media.settings import StreamSettings
from tunnel_agent.media.urls import SourceKind, parse_source, redact_url

CAMERA = {"name": "lobby", "url": "rtsp://10.0.0.5:554/stream1"}


def load(tmp_path: Path, document: dict[str, object]) -> object:
    path = tmp_path / "agent.toml"
    path.write_text(toml_writer.dumps(document))
    return load_settings(path)


def problems(tmp_path: Path, document: dict[str, object]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, document)
    return caught.value.problems


def test_iot_operations_spellings_are_accepted(tmp_path: Path) -> None:
    stream = {
        "name": "snaps",
        "taskType": "snapshot-to-mqtt",
        "taskFormat": "jpg",
        "snapshotsPerSecond": 0.25,
        "qos": "Qos1",
        "retain": "Never",
        "ttl": 60,
    }
    restream = {
        "name": "out",
        "taskType": "stream-to-rtsp",
        "mediaServerAddress": "media.example.net",
        "mediaServerPort": 8554,
        "mediaServerPath": "lobby",
        "mediaServerUsername": "pub",
        "mediaServerPassword": "pub-secret",
    }
    settings = load(
        tmp_path,
        {
            "mqtt": {"url": "mqtt://broker:1883"},
            "cameras": [{**CAMERA, "streams": [stream, restream]}],
        },
    )
    snaps, out = settings.cameras[0].streams  # type: ignore[attr-defined]
    assert (
        snaps.task,
        snaps.image_format,
        snaps.snapshots_per_second,
        snaps.qos,
        snaps.retain,
    ) == (
        "snapshot-to-mqtt",
        "jpeg",
        0.25,
        1,
        False,
    )
    assert snaps.topic_for("lobby") == "azure-iot-operations/data/lobby/snaps"
    assert (out.media_server_address, out.media_server_path) == ("media.example.net", "lobby")
    assert "pub-secret" not in repr(settings)


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        ({"name": "s", "task": "snapshot-to-fs"}, "snapshot-to-fs needs path"),
        ({"name": "s", "task": "clip-to-fs", "path": "/d", "format": "gif"}, "not a clip format"),
        (
            {"name": "s", "task": "snapshot-to-fs", "path": "/d", "format": "webp"},
            "not an image format",
        ),
        ({"name": "s", "task": "stream-to-rtsp"}, "needs media_server_address"),
        (
            {"name": "s", "task": "clip-to-fs", "path": "/d", "topic": "x"},
            "topic does not apply to clip-to-fs",
        ),
        (
            {"name": "s", "task": "snapshot-to-fs", "path": "/d", "duration": 5},
            "duration does not apply",
        ),
        (
            {"name": "s", "task": "snapshot-to-fs", "path": "/d", "snapshots_per_second": -1},
            "greater than or equal to 0",
        ),
        ({"name": "s", "task": "copy-to-cloud"}, "Input should be"),
        ({"name": "s", "task": "snapshot-to-mqtt", "topic": "a/#"}, "without wildcards"),
        ({"name": "bad name", "task": "snapshot-to-mqtt"}, "should match pattern"),
    ],
)
def test_stream_errors_name_camera_stream_and_field(
    tmp_path: Path, stream: dict[str, object], expected: str
) -> None:
    found = problems(
        tmp_path, {"mqtt": {"url": "mqtt://b"}, "cameras": [{**CAMERA, "streams": [stream]}]}
    )
    assert any(
        p.startswith("cameras.0.streams.0") and "(camera 'lobby'" in p and expected in p
        for p in found
    ), found


def test_camera_level_stream_rules(tmp_path: Path) -> None:
    mqtt_stream = {"name": "s", "task": "snapshot-to-mqtt"}
    assert any(
        "needs an [mqtt] section" in p
        for p in problems(tmp_path, {"cameras": [{**CAMERA, "streams": [mqtt_stream]}]})
    )
    twice = [
        {"name": "s", "task": "snapshot-to-fs", "path": "/a"},
        {"name": "s", "task": "snapshot-to-fs", "path": "/b"},
    ]
    assert any(
        "used twice" in p for p in problems(tmp_path, {"cameras": [{**CAMERA, "streams": twice}]})
    )
    no_url = {"name": "lobby", "streams": [{"name": "s", "task": "snapshot-to-fs", "path": "/a"}]}
    assert any("url is needed" in p for p in problems(tmp_path, {"cameras": [no_url]}))
    assert any("mqtt.url" in p for p in problems(tmp_path, {"mqtt": {"url": "http://broker"}}))


def test_formats_default_per_task() -> None:
    assert StreamSettings(name="a", task="snapshot-to-mqtt").image_format == "jpeg"
    assert StreamSettings(name="a", task="snapshot-to-fs", path=Path("/x")).image_format == "png"
    assert StreamSettings(name="a", task="clip-to-fs", path=Path("/x")).clip_format == (
        "matroska",
        "mkv",
    )
    assert StreamSettings(
        name="a", task="clip-to-fs", path=Path("/x"), format="mts"
    ).clip_format == ("mpegts", "mts")


@pytest.mark.parametrize(
    ("url", "kind", "display"),
    [
        ("rtsp://admin:pw@cam:554/s?token=1", SourceKind.RTSP, "rtsp://admin:***@cam:554/s?***"),
        ("rtsps://cam/s", SourceKind.RTSP, "rtsps://cam/s"),
        ("https://cam/snapshot.jpg", SourceKind.HTTP_SNAPSHOT, "https://cam/snapshot.jpg"),
        ("file:///media/a.mkv", SourceKind.FILE, "file:///media/a.mkv"),
        ("file:///media/pictures/", SourceKind.FOLDER, "file:///media/pictures/"),
        ("file:///dev/video0", SourceKind.V4L2, "file:///dev/video0"),
    ],
)
def test_source_urls(url: str, kind: SourceKind, display: str) -> None:
    address = parse_source(url)
    assert address.kind is kind
    assert address.display == display


def test_configured_credentials_go_into_the_open_url_only() -> None:
    address = parse_source("rtsp://cam:554/s", "admin", "p@ss:word")
    assert address.open_url == "rtsp://admin:p%40ss%3Aword@cam:554/s"
    assert "word" not in address.display and "word" not in repr(address)
    assert redact_url(address.open_url) == "rtsp://admin:***@cam:554/s"


def test_pacer_keeps_the_long_run_rate_without_backlog() -> None:
    pacer = SnapshotPacer(2.0)
    frames = [i / 15 for i in range(15 * 60)]  # 60 s of a 15 fps camera
    assert sum(pacer.due(t) for t in frames) in (119, 120, 121)
    gap = SnapshotPacer(1.0)
    assert gap.due(0.0) and gap.due(10.0)  # after a stall: one snapshot, not ten
    assert not gap.due(10.5)
    assert all(SnapshotPacer(0).due(t) for t in frames[:30])


def test_keyframe_only_decoding_when_every_rate_allows() -> None:
    rate = KeyframeRate()
    for second in range(5):
        rate.keyframe(float(second))
    assert rate.per_second == pytest.approx(1.0)
    assert keyframes_suffice([0.5, 1.0], rate.per_second)
    assert not keyframes_suffice([0.5, 2.0], rate.per_second)
    assert not keyframes_suffice([0], rate.per_second)  # 0 = every frame
    assert not keyframes_suffice([0.5], None)
    early = KeyframeRate()
    early.keyframe(0.0)
    assert early.per_second is None


def test_keyframe_only_decoding_does_not_flap_at_the_keyframe_rate() -> None:
    """1 snapshot/s on a camera with a keyframe every second, its measured rate wobbling."""
    state, switches = False, 0
    for measured in [1.0, 0.999, 1.001, 0.998, 1.002, 0.97, 1.0] * 5:
        wanted = keyframes_suffice([1.0], measured, currently=state)
        switches += wanted != state
        state = wanted
    assert state and switches == 1
    assert not keyframes_suffice([1.5], 1.0, currently=True)  # a real change still switches off


def test_pacer_takes_frames_a_little_early_as_on_time() -> None:
    pacer = SnapshotPacer(1.0)
    keyframes = [0.0] + [second - 0.003 * (second % 2) for second in range(1, 30)]
    assert sum(pacer.due(t) for t in keyframes) == 30


def test_a_keyframe_taken_early_restarts_the_schedule_from_itself() -> None:
    """32 fps, 1/s, keyframes at frame 0, 29 (0.094 s early for the second snapshot), then every
    64: the snapshots follow the keyframes (each group of pictures costs its keyframe and the
    frames up to the middle one instead of a few more each), one per second."""
    keyframes = {0, 29, *range(93, 400, 64)}

    def taken(pacer: SnapshotPacer) -> list[int]:  # as the source asks: early for keyframes only
        return [
            n
            for n in range(400)
            if pacer.is_due(n / 32, early=n in keyframes)
            and pacer.due(n / 32, keyframe=n in keyframes)
        ]

    assert taken(SnapshotPacer(1.0)) == [0, *range(29, 400, 32)]  # 13 in 12.5 s
    keyframes = {0, *range(64, 400, 64)}  # keyframes on the schedule keep it as it is
    assert taken(SnapshotPacer(1.0)) == list(range(0, 400, 32))


def test_a_snapshot_due_just_before_a_keyframe_waits_for_it_within_the_tolerance() -> None:
    pacer = SnapshotPacer(1.0)
    assert pacer.due(0.0, keyframe=True)  # next due at 1.0, tolerance 0.1 s
    assert pacer.is_due(1.0, early=False)
    assert pacer.waits_for_keyframe(1.0, next_keyframe_at=1.08)
    assert pacer.waits_for_keyframe(1.06, next_keyframe_at=1.05)  # a keyframe running late
    assert not pacer.waits_for_keyframe(1.0, next_keyframe_at=1.12)  # too late for this one
    assert not pacer.waits_for_keyframe(1.1, next_keyframe_at=1.08)  # the tolerance is over
    assert not pacer.waits_for_keyframe(1.0, next_keyframe_at=None)  # keyframe rate unknown
    assert not pacer.waits_for_keyframe(1.0, next_keyframe_at=0.5)  # a stale guess
    assert not SnapshotPacer(0).waits_for_keyframe(1.0, next_keyframe_at=1.0)
    rate = KeyframeRate()
    assert rate.next_at is None
    rate.keyframe(0.0)
    rate.keyframe(0.04)  # an irregular first interval is forgotten at the next keyframe
    rate.keyframe(2.04)
    assert rate.next_at == pytest.approx(4.04)


def test_a_large_step_back_is_a_restart_not_a_drop() -> None:
    validator = TimestampValidator()
    assert validator.is_valid(900_000)
    assert not validator.is_valid(899_000) and not validator.jumped_back(899_000, 90_000)
    assert not validator.is_valid(0) and validator.jumped_back(0, 90_000)
    validator.restart(0)
    assert validator.is_valid(3000)


def test_timestamp_validator_drops_missing_and_non_increasing() -> None:
    validator = TimestampValidator()
    assert [validator.is_valid(d) for d in (0, 3000, None, 3000, 2000, 6000)] == [
        True,
        True,
        False,
        False,
        False,
        True,
    ]
    assert validator.dropped == 3


def test_names_sort_by_time_and_temporaries_are_hidden() -> None:
    files = StreamFiles("front-door", "mkv")
    name = files.final_name(datetime(2026, 11, 23, 15, 4, 5, 678000, tzinfo=UTC), 42)
    assert name == "front-door-20261123T150405.678Z-000042.mkv"
    temporary = temporary_path(Path("/data") / name)
    assert temporary.name.startswith(".") and files.is_own_temporary(temporary.name)
    assert files.is_own(name) and not files.is_own_temporary(name)


def test_backoff_grows_is_capped_and_resets_after_a_stable_run() -> None:
    backoff = Backoff(initial_s=1, max_s=8, stable_after_s=60, _rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(6)]
    caps = [1, 2, 4, 8, 8, 8]
    assert all(cap / 2 <= d <= cap for d, cap in zip(delays, caps, strict=True))
    backoff.ran_for(5)
    assert backoff.next_delay() >= 4
    backoff.ran_for(61)
    assert backoff.next_delay() <= 1
