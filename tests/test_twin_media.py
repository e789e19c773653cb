"""The twin's ``mediaStreams`` through a real hub link, a real agent and a real camera: what it
may not do is refused with the field named and nothing created or changed; what it may do runs,
inside ``output_root``, and never touches a file that is not its own."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import camera_entry
from tests.support.agent import AgentRunner
from tests.support.camera import RtspCamera
from tests.support.hub import HubHarness
from tests.support.net import free_port
from tests.support.threadloop import ThreadLoop
from tests.support.waiting import until
from tests.test_media import ffprobe_json
from tunnel_agent.cloud.devhub.certs import LocalCA

FAST_MEDIA = {"watchdog": 3.0, "backoff_initial": 0.5, "backoff_max": 2.0}
PASSWORD = "Tw1n-Server-Pa55"


class TwinAgent:
    def __init__(self, hub: HubHarness, agent: AgentRunner, servers: ThreadLoop) -> None:
        self.hub, self.agent, self.servers = hub, agent, servers

    async def send(self, value: Any) -> dict[str, Any]:
        """Set the desired value; the acknowledgement that answers it."""
        twin = self.hub.link.twin
        version = await self.servers.call(self.hub.link.send_desired({"mediaStreams": value}))
        await until(lambda: twin.reported.get("mediaStreams", {}).get("av") == version, 30)
        ack: dict[str, Any] = twin.reported["mediaStreams"]
        return ack

    def running(self) -> set[str]:
        media = self.hub.link.twin.reported.get("media", [])
        return {m["stream"] for m in media if m["state"] == "running"}


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    for folder in (root, outside, root / "lobby" / "clips"):
        folder.mkdir(parents=True)
    (root / "escape").symlink_to(outside)
    return {"root": root, "outside": outside, "clips": root / "lobby" / "clips"}


@pytest.fixture
def twin_agent(
    tmp_path: Path, ca: LocalCA, servers: ThreadLoop, camera: RtspCamera, layout: dict[str, Path]
) -> Iterator[TwinAgent]:
    hub = HubHarness(tmp_path, ca, servers, device_id="twin-media")
    agent = AgentRunner(
        tmp_path / "agent",
        {
            "hub": {**hub.hub_config(), "retry_interval": 1},
            "cameras": [camera_entry(camera, streams=[BASE])],
            "media": {
                **FAST_MEDIA,
                "output_root": str(layout["root"]),
                "allowed_media_servers": ["127.0.0.1"],
            },
            "observability": {"listen": f"127.0.0.1:{free_port()}", "twin_report_interval": 1},
        },
    )
    try:
        agent.wait_connected()
        yield TwinAgent(hub, agent, servers)
    finally:
        agent.stop()
        hub.stop()


def tree(*folders: Path) -> dict[str, int]:
    return {
        str(p): p.lstat().st_size for f in folders for p in f.rglob("*") if "base" not in p.parts
    }


BASE = {"name": "base", "task": "snapshot-to-fs", "path": "base", "snapshots_per_second": 1}


def lobby(*streams: dict[str, Any]) -> list[dict[str, Any]]:
    """The camera's streams as the cloud wants them: the file's stream, and ``streams``."""
    return [{"camera": "lobby", "streams": [BASE, *streams]}]


def clip(path: str, **extra: Any) -> dict[str, Any]:
    return {"name": "clips", "taskType": "clip-to-fs", "path": path, "duration": 1, **extra}


def restream(task: str, host: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": "out",
        "taskType": task,
        "mediaServerAddress": host,
        "mediaServerPort": 8554,
        "mediaServerUsername": "pub",
        "mediaServerPassword": PASSWORD,
        **extra,
    }


REFUSED = [
    (clip("/etc/cron.d", format="ts", max_age=0.001, min_free_bytes=0), "path: must be relative"),
    (clip("../outside"), "path: must not contain '..'"),
    (clip("escape/clips"), "path: leaves [media] output_root through a symbolic link"),
    (clip("lobby/clips", min_free_bytes=0), "min_free_bytes: must be at least 67108864"),
    (
        {"name": "fast", "taskType": "snapshot-to-fs", "path": "fast", "snapshotsPerSecond": 60},
        "snapshotsPerSecond: must be more than 0 and at most 5",
    ),
    (restream("stream-to-rtsps", "10.9.8.7"), "mediaServerAddress: '10.9.8.7' is not in"),
    (restream("stream-to-rtsp", "127.0.0.1"), "taskType: stream-to-rtsp (unencrypted)"),
    (
        restream("stream-to-rtsps", "127.0.0.1", mediaServerCertificate="/etc/ssl/certs/x.pem"),
        "mediaServerCertificate: a file on the device cannot be named from the twin",
    ),
]


async def test_what_the_twin_may_not_do_is_refused_and_changes_nothing(
    twin_agent: TwinAgent, layout: dict[str, Path]
) -> None:
    await until(lambda: twin_agent.running() == {"base"}, 30)
    before = tree(layout["root"], layout["outside"])
    for stream, reason in REFUSED:
        ack = await twin_agent.send(lobby(stream))
        assert ack["ac"] == 400, ack
        assert ack["ad"].startswith("mediaStreams[0].streams[1] "), ack["ad"]
        assert reason in ack["ad"], ack["ad"]
        assert tree(layout["root"], layout["outside"]) == before
    thousand = [{**clip(f"c{i}"), "name": f"c{i}"} for i in range(1000)]
    ack = await twin_agent.send(lobby(*thousand))
    assert ack["ac"] == 400 and "1001 streams on all cameras" in ack["ad"]
    assert "max_streams = 16" in ack["ad"]
    assert tree(layout["root"], layout["outside"]) == before
    # Nothing running changed, and no password was ever reported or logged.
    assert twin_agent.running() == {"base"}
    reported = json.dumps(twin_agent.hub.link.twin.reported)
    assert PASSWORD not in reported and PASSWORD not in twin_agent.agent.output()
    assert '"mediaServerPassword": "***"' in json.dumps(
        (await twin_agent.send(lobby(restream("stream-to-rtsps", "10.9.8.7"))))["value"]
    )
    count = len(list((layout["root"] / "base").glob("*.png")))
    await until(lambda: len(list((layout["root"] / "base").glob("*.png"))) > count, 10)


async def test_clips_from_the_twin_run_inside_output_root_and_spare_foreign_files(
    twin_agent: TwinAgent, layout: dict[str, Path]
) -> None:
    clips = layout["clips"]
    foreign = {
        "notes.mkv": b"a foreign clip",
        "20200101T000000.000Z-000001.mkv": b"an old-style name",
        "other-20200101T000000.000Z-000001.mkv": b"another stream's clip",
        ".clips-something.mkv.partial": b"not a name this stream gives",
    }
    for name, data in foreign.items():
        (clips / name).write_bytes(data)
    ack = await twin_agent.send(lobby(clip("lobby/clips", max_files=1)))
    assert ack["ac"] == 200, ack
    twin_agent.agent.wait_event("media.clip_written", count=4, timeout_s=40)
    await until(lambda: twin_agent.running() == {"base", "clips"}, 10)
    ack = await twin_agent.send(lobby())  # the cloud takes the clips away again
    assert ack["ac"] == 200
    await until(lambda: twin_agent.running() == {"base"}, 20)
    for name, data in foreign.items():
        assert (clips / name).read_bytes() == data, name
    own = sorted(p for p in clips.iterdir() if p.name.startswith("clips-"))
    assert len(own) == 1  # max_files = 1: the rest were deleted, only this stream's files
    assert ffprobe_json(own[0])["streams"][0]["codec_name"] == "h264"
