"""What the twin's ``mediaStreams`` may ask for: each rule on its own, on a real folder tree."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tunnel_agent.config.settings import CameraSettings
from tunnel_agent.media.desired import (
    DesiredError,
    acknowledgement,
    parse_desired_streams,
)
from tunnel_agent.media.settings import MediaSettings, StreamSettings

CAMERA_URL = "rtsp://127.0.0.1:8554/test"


def tree(tmp_path: Path) -> tuple[Path, Path]:
    """output_root with a symbolic link leading out of it, and the folder outside."""
    root, outside = tmp_path / "media", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    (root / "inside").symlink_to(root / "kept")
    return root, outside


def listing(*folders: Path) -> set[str]:
    return {str(p) for folder in folders for p in folder.rglob("*")}


def parse(
    value: Any,
    media: MediaSettings,
    file_streams: list[dict[str, Any]] | None = None,
    cameras: int = 1,
) -> dict[str, list[StreamSettings]]:
    configured = [StreamSettings.model_validate(s) for s in file_streams or []]
    settings = {
        f"cam{i}": CameraSettings(
            name=f"cam{i}", url=CAMERA_URL, streams=configured if i == 0 else []
        )
        for i in range(cameras)
    }
    return parse_desired_streams(
        value, settings, False, media, {name: c.streams for name, c in settings.items()}
    )


def desired(*streams: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"camera": "cam0", "streams": list(streams)}]


def clip(path: str, **extra: Any) -> dict[str, Any]:
    return {"name": "clips", "taskType": "clip-to-fs", "path": path, **extra}


def restream(
    task: str = "stream-to-rtsps", host: str = "media.example.net", **extra: Any
) -> dict[str, Any]:
    return {"name": "out", "taskType": task, "mediaServerAddress": host, **extra}


def refusal(value: Any, media: MediaSettings, **kwargs: Any) -> str:
    with pytest.raises(DesiredError) as caught:
        parse(value, media, **kwargs)
    return str(caught.value)


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/etc/cron.d", "path: must be relative to [media] output_root"),
        ("../outside", "path: must not contain '..'"),
        ("a/../../outside", "path: must not contain '..'"),
        ("escape", "path: leaves [media] output_root through a symbolic link"),
        ("escape/deeper/still", "path: leaves [media] output_root through a symbolic link"),
    ],
)
def test_folders_outside_output_root_are_refused_and_nothing_is_created(
    tmp_path: Path, path: str, reason: str
) -> None:
    root, outside = tree(tmp_path)
    before = listing(root, outside)
    message = refusal(desired(clip(path)), MediaSettings(output_root=root))
    assert message.startswith("mediaStreams[0].streams[0] ('clips').") and reason in message
    assert listing(root, outside) == before


def test_the_issue_example_is_refused(tmp_path: Path) -> None:
    root, _ = tree(tmp_path)
    value = [
        {
            "camera": "cam0",
            "streams": [
                {
                    "name": "x",
                    "taskType": "clip-to-fs",
                    "path": "/etc/cron.d",
                    "format": "ts",
                    "max_age": 0.001,
                    "min_free_bytes": 0,
                }
            ],
        }
    ]
    assert "must be relative" in refusal(value, MediaSettings(output_root=root))


def test_relative_folders_resolve_inside_output_root(tmp_path: Path) -> None:
    root, _ = tree(tmp_path)
    (root / "kept").mkdir()
    changes = parse(
        desired(clip("lobby/clips"), {**clip("inside/x"), "name": "other"}),
        MediaSettings(output_root=root),
    )
    paths = [s.path for s in changes["cam0"]]
    assert paths == [root.resolve() / "lobby" / "clips", root.resolve() / "kept" / "x"]
    assert not (root / "lobby").exists()  # parsing creates nothing


def test_output_root_itself_may_be_a_link(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    (changes,) = parse(desired(clip("c")), MediaSettings(output_root=tmp_path / "link")).values()
    assert changes[0].path == real / "c"


def test_low_disk_guard_and_snapshot_rate_are_floors_not_clamped(tmp_path: Path) -> None:
    media = MediaSettings(output_root=tmp_path, max_snapshots_per_second=5)
    for value, field in (
        (desired(clip("c", min_free_bytes=0)), "min_free_bytes: must be at least 67108864"),
        (desired(clip("c", min_free_bytes=64 * 2**20 - 1)), "min_free_bytes: must be at least"),
        (
            desired(
                {"name": "s", "taskType": "snapshot-to-fs", "path": "s", "snapshotsPerSecond": 60}
            ),
            "snapshotsPerSecond: must be more than 0 and at most 5",
        ),
        (
            desired(
                {"name": "s", "taskType": "snapshot-to-fs", "path": "s", "snapshotsPerSecond": 0}
            ),
            "snapshotsPerSecond: must be more than 0 and at most 5",
        ),
    ):
        assert field in refusal(value, media)
    (kept,) = parse(
        desired(
            clip("c", min_free_bytes=64 * 2**20),
            {"name": "s", "task": "snapshot-to-fs", "path": "s", "snapshots_per_second": 5},
        ),
        media,
    ).values()
    assert kept[0].min_free_bytes == 64 * 2**20 and kept[1].snapshots_per_second == 5


def test_restreaming_needs_an_allowed_server_and_tls(tmp_path: Path) -> None:
    closed = MediaSettings(output_root=tmp_path)
    assert "mediaServerAddress: 'media.example.net' is not in [media] allowed_media_servers" in (
        refusal(desired(restream()), closed)
    )
    allowed = MediaSettings(output_root=tmp_path, allowed_media_servers=["*.example.net"])
    assert parse(desired(restream(host="Media.Example.NET")), allowed)["cam0"][0].task == (
        "stream-to-rtsps"
    )
    assert "is not in [media] allowed_media_servers" in refusal(
        desired(restream(host="192.168.1.10")), allowed
    )
    assert "taskType: stream-to-rtsp (unencrypted) from the twin needs" in refusal(
        desired(restream("stream-to-rtsp")), allowed
    )
    plain = MediaSettings(
        output_root=tmp_path,
        allowed_media_servers=["media.example.net"],
        allow_plain_restream_from_twin=True,
    )
    assert parse(desired(restream("stream-to-rtsp")), plain)["cam0"][0].task == "stream-to-rtsp"


@pytest.mark.parametrize("key", ["mediaServerCertificate", "media_server_ca_file"])
def test_certificate_paths_are_refused_without_looking_at_them(tmp_path: Path, key: str) -> None:
    media = MediaSettings(output_root=tmp_path, allowed_media_servers=["*"])
    existing, missing = tmp_path / "ca.pem", tmp_path / "nothing.pem"
    existing.write_text("pem")
    answers = {
        refusal(desired(restream(**{key: str(path)})), media) for path in (existing, missing)
    }
    (answer,) = answers  # the same answer whether the file exists or not
    assert f"{key}: a file on the device cannot be named from the twin" in answer


def test_max_streams_counts_every_camera_and_both_sources(tmp_path: Path) -> None:
    media = MediaSettings(output_root=tmp_path, max_streams=4)
    file_streams = [{"name": f"f{i}", "task": "snapshot-to-fs", "path": f"f{i}"} for i in range(2)]
    snaps = [{"name": f"t{i}", "task": "snapshot-to-fs", "path": f"t{i}"} for i in range(3)]
    other_camera = [{"camera": "cam1", "streams": snaps}]
    # cam0 keeps its two file streams: 2 + 3 > 4
    message = refusal(other_camera, media, file_streams=file_streams, cameras=2)
    assert message == (
        "mediaStreams: 5 streams on all cameras, more than this device runs"
        " ([media] max_streams = 4)"
    )
    # cam0 listed with none: 0 + 3
    value = [{"camera": "cam0", "streams": []}, *other_camera]
    assert len(parse(value, media, file_streams=file_streams, cameras=2)["cam1"]) == 3


def test_a_thousand_streams_are_refused_before_any_is_read(tmp_path: Path) -> None:
    media = MediaSettings(output_root=tmp_path)
    streams = [clip(f"c{i}") | {"name": f"c{i}"} for i in range(1000)]
    message = refusal(desired(*streams), media)
    assert "1000 streams on all cameras" in message and "max_streams = 16" in message
    assert list(tmp_path.iterdir()) == []


def test_a_stream_identical_to_the_file_grants_nothing_new(tmp_path: Path) -> None:
    media = MediaSettings(output_root=tmp_path)
    from_file = {
        "name": "archive",
        "task": "clip-to-fs",
        "path": str(tmp_path / "absolute"),
        "min_free_bytes": 0,
    }
    (kept,) = parse(desired(from_file), media, file_streams=[from_file]).values()
    assert kept[0].path == tmp_path / "absolute"
    changed = {**from_file, "duration": 5}
    assert "path: must be relative" in refusal(desired(changed), media, file_streams=[from_file])


def test_acknowledgements_mask_every_password() -> None:
    value = desired(
        restream(mediaServerUsername="pub", mediaServerPassword="Tw1n-Secret"),
        {"name": "b", "media_server_password": "Other-Secret", "nested": [{"password": "x1y2"}]},
    )
    ack = acknowledgement(value, 400, 7, "refused")["mediaStreams"]
    text = repr(ack)
    assert "Tw1n-Secret" not in text and "Other-Secret" not in text and "x1y2" not in text
    streams = ack["value"][0]["streams"]
    assert streams[0]["mediaServerPassword"] == "***" and streams[0]["mediaServerUsername"] == "pub"
    assert streams[1]["media_server_password"] == "***"
    assert value[0]["streams"][0]["mediaServerPassword"] == "Tw1n-Secret"  # the input is untouched


def test_a_file_config_beyond_max_streams_is_refused_at_load(tmp_path: Path) -> None:
    from tests.support import toml_writer
    from tunnel_agent.config.loading import ConfigError, load_settings

    streams = [{"name": f"s{i}", "task": "snapshot-to-fs", "path": f"s{i}"} for i in range(3)]
    path = tmp_path / "agent.toml"
    path.write_text(
        toml_writer.dumps(
            {
                "media": {"max_streams": 2},
                "cameras": [{"name": "a", "url": CAMERA_URL, "streams": streams}],
            }
        )
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert any(
        "3 streams configured, more than media.max_streams (2)" in p for p in caught.value.problems
    )
    assert os.listdir(tmp_path) == ["agent.toml"]
