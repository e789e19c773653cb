"""The device twin through a real hub: reports at most every interval, and ``mediaStreams``
changes only the cameras it names, never a tunnel, with ``null`` giving back the file's streams."""

from __future__ import annotations

import asyncio
import itertools
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.conftest import camera_entry
from tests.support.agent import AgentRunner
from tests.support.camera import RtspCamera
from tests.support.hub import HubHarness
from tests.support.net import free_port
from tests.support.threadloop import ThreadLoop
from tests.support.waiting import until
from tests.support.ws_endpoint import TunnelEndpoint
from tests.test_tunnel_video import ffprobe
from tunnel_agent.cloud.devhub.certs import LocalCA

REPORT_INTERVAL_S = 2.0
FAST_MEDIA = {"watchdog": 3.0, "backoff_initial": 0.5, "backoff_max": 2.0}


def snapshots(name: str, path: Path | str) -> dict[str, Any]:
    return {"name": name, "task": "snapshot-to-fs", "path": str(path), "snapshots_per_second": 2}


def count(folder: Path) -> int:
    return len(list(folder.glob("*.png"))) if folder.is_dir() else 0


def seconds(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["ts"].replace("Z", "+00:00")).timestamp()


async def test_media_streams_change_only_named_cameras_never_tunnels_and_null_restores(
    tmp_path: Path,
    ca: LocalCA,
    servers: ThreadLoop,
    camera: RtspCamera,
    endpoint: TunnelEndpoint,
) -> None:
    own_hub = HubHarness(tmp_path, ca, servers, device_id="twin-streams")
    root = tmp_path / "root"
    cameras = [
        camera_entry(camera, streams=[snapshots("base", root / "base")]),
        {"name": "door", "url": camera.url(), "streams": [snapshots("doorbase", root / "door")]},
    ]
    agent = AgentRunner(
        tmp_path / "agent",
        {
            "hub": {**own_hub.hub_config(), "retry_interval": 1},
            "tunnel": {"ca_file": str(ca.cert_file)},
            "cameras": cameras,
            "media": {**FAST_MEDIA, "output_root": str(root)},
            "observability": {
                "listen": f"127.0.0.1:{free_port()}",
                "twin_report_interval": REPORT_INTERVAL_S,
            },
        },
    )
    twin = own_hub.link.twin

    def media() -> dict[str, str]:
        return {m["stream"]: m["state"] for m in twin.reported.get("media", [])}

    async def send(value: Any) -> dict[str, Any]:
        version = await servers.call(own_hub.link.send_desired({"mediaStreams": value}))
        await until(lambda: twin.reported.get("mediaStreams", {}).get("av") == version, 30)
        ack: dict[str, Any] = twin.reported["mediaStreams"]
        return ack

    try:
        agent.wait_connected()
        own_hub.wait_device()
        await until(lambda: media() == {"base": "running", "doorbase": "running"}, 30)
        session = await servers.call(endpoint.new_session())
        status, _ = await own_hub.tunnel_open(
            endpoint.url(f"/tunnel/{session.id}"), session.token, camera.port
        )
        assert status == 200

        # The cloud gives the lobby other streams: the door keeps its own, the tunnel stays.
        added = {**snapshots("added", "lobby/added"), "taskType": "snapshot-to-fs"}
        del added["task"]
        ack = await send([{"camera": "lobby", "streams": [added]}])
        assert ack["ac"] == 200, ack
        await until(lambda: media() == {"added": "running", "doorbase": "running"}, 30)
        door_files = count(root / "door")
        await until(lambda: count(root / "lobby" / "added") >= 2, 20)
        await until(lambda: count(root / "door") > door_files, 20)
        assert not agent.events("tunnel.closed")
        info = await ffprobe(f"rtsp://127.0.0.1:{session.consumer_port}/test")
        assert info["streams"][0]["codec_name"] == "h264"  # type: ignore[index]
        (closed,) = agent.wait_event("tunnel.closed")
        await servers.call(asyncio.wait_for(session.finished.wait(), 20))  # its counts are final
        # The video came through the agent: all it sent, but what was in flight at the hang-up.
        assert int(closed["bytes_to_remote"]) >= session.counters.to_consumer > 2_000
        assert int(closed["bytes_to_camera"]) == session.counters.to_device > 100

        # null: the lobby runs the file's streams again.
        base_files = count(root / "base")
        ack = await send(None)
        assert (ack["ac"], ack["ad"]) == (
            200,
            "removed: streams from the configuration file restored",
        )
        await until(lambda: media() == {"base": "running", "doorbase": "running"}, 30)
        await until(lambda: count(root / "base") > base_files, 20)
    finally:
        agent.stop()
        own_hub.stop()

    # Reported state went out at most every interval, acknowledgements included.
    reports = [seconds(e) for e in agent.events("twin.reported")]
    assert len(reports) >= 3
    gaps = [later - earlier for earlier, later in itertools.pairwise(reports)]
    assert min(gaps) >= REPORT_INTERVAL_S - 0.1, gaps
