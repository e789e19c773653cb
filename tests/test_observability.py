"""Health, readiness, metrics, status and the device twin, from real tunnels and media tasks."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import AgentFactory, camera_entry
from tests.support import dtdl
from tests.support.agent import AgentRunner
from tests.support.camera import RtspCamera
from tests.support.hub import HubHarness
from tests.support.metrics import metric, scrape
from tests.support.net import free_port
from tests.support.threadloop import ThreadLoop
from tests.support.waiting import until
from tests.support.ws_endpoint import TunnelEndpoint, sink_handler
from tests.test_tunnel_video import ffprobe
from tunnel_agent import __version__
from tunnel_agent.cloud.devhub.certs import LocalCA
from tunnel_agent.media.settings import StreamSettings

INTERFACE = Path(__file__).resolve().parents[1] / "dtdl" / "AgentStatus.json"
FAST_MEDIA = {"watchdog": 3.0, "backoff_initial": 0.5, "backoff_max": 2.0}


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def test_metrics_and_status_follow_real_tunnels(
    agent_factory: AgentFactory,
    hub: HubHarness,
    camera: RtspCamera,
    endpoint: TunnelEndpoint,
    servers: ThreadLoop,
) -> None:
    agent = agent_factory([camera_entry(camera)])
    assert get(f"{agent.observability_url}/healthz") == (200, '{"status": "ok"}')

    held = await servers.call(endpoint.new_session(handler=sink_handler))
    status, body = await hub.tunnel_open(
        endpoint.url(f"/tunnel/{held.id}"), held.token, camera.port
    )
    assert status == 200
    assert (await hub.tunnel_open(endpoint.url("/status/403"), "t", camera.port))[0] == 403
    assert (await hub.tunnel_open(endpoint.url("/status/403"), "t", 1))[0] == 400
    video = await servers.call(endpoint.new_session())
    assert (await hub.tunnel_open(endpoint.url(f"/tunnel/{video.id}"), video.token, camera.port))[
        0
    ] == 200
    await ffprobe(f"rtsp://127.0.0.1:{video.consumer_port}/test")
    agent.wait_event("tunnel.closed")

    _, text = get(f"{agent.observability_url}/metrics")
    assert metric(text, "tunnel_agent_tunnels_open") == 1
    assert metric(text, "tunnel_agent_tunnel_open_answers_total", code="200") == 2
    assert metric(text, "tunnel_agent_tunnel_open_answers_total", code="403") == 1
    assert metric(text, "tunnel_agent_tunnel_open_answers_total", code="400") == 1
    assert metric(text, "tunnel_agent_tunnel_open_seconds_count") == 4
    assert metric(text, "tunnel_agent_tunnel_duration_seconds_count") == 1
    # Exactly what the tunnel's closing line says; the consumer got all of it but what was still
    # in flight when it hung up, and everything it sent reached the camera.
    closed = agent.events("tunnel.closed")[-1]
    to_remote = metric(text, "tunnel_agent_tunnel_bytes_total", direction="to_remote")
    assert to_remote == int(closed["bytes_to_remote"]) >= video.counters.to_consumer > 2_000
    assert (
        metric(text, "tunnel_agent_tunnel_bytes_total", direction="to_camera")
        == int(closed["bytes_to_camera"])
        == video.counters.to_device
    )
    assert metric(text, "tunnel_agent_hub_connected") == 1

    status_doc = json.loads(get(f"{agent.observability_url}/status")[1])
    assert [t["id"] for t in status_doc["tunnels"]] == [body["tunnelId"]]
    assert status_doc["hub"]["connected"] is True and status_doc["version"] == __version__
    table = subprocess.run(
        [sys.executable, "-m", "tunnel_agent", "status", "--url", agent.observability_url],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "Open tunnels: 1 (1 closed since start)" in table
    assert re.search(rf"^{body['tunnelId']}\s+lobby\s+{camera.port}\s", table, re.M), table


def assert_metrics_sum_correctly(text: str) -> None:
    """One unit per metric, label values without spaces, build info and the process collector."""
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for family in families.values():
        for sample in family.samples:
            assert "event" not in sample.labels, sample
            assert not any(" " in value for value in sample.labels.values()), sample
    (build,) = families["tunnel_agent_build_info"].samples
    assert build.value == 1 and build.labels["version"] == __version__
    assert families["process_cpu_seconds"].samples[0].value > 0
    assert families["process_resident_memory_bytes"].samples[0].value > 0
    states = {s.labels["state"] for s in families["tunnel_agent_media_task_state"].samples}
    assert states == {
        "starting",
        "waiting",
        "running",
        "backing_off",
        "paused",
        "failed",
        "stopped",
    }


async def test_readyz_follows_the_hub_link(
    tmp_path: Path, ca: LocalCA, servers: ThreadLoop
) -> None:
    own_hub = HubHarness(tmp_path, ca, servers, device_id="ready-cam")
    agent = AgentRunner(
        tmp_path / "agent", {"hub": {**own_hub.hub_config(), "retry_interval": 1}, "cameras": []}
    )
    try:
        agent.wait_connected()
        assert get(f"{agent.observability_url}/readyz")[0] == 200
        servers.run(own_hub.broker.stop())
        # The SDK's thread has to see the link drop and the agent to hear of it: on a loaded
        # machine that can take more than the default few seconds.
        await until(lambda: get(f"{agent.observability_url}/readyz")[0] == 503, timeout_s=20)
        assert "hub link is not connected" in get(f"{agent.observability_url}/readyz")[1]
        assert get(f"{agent.observability_url}/healthz")[0] == 200  # alive all along
        servers.run(own_hub.broker.start())
        await until(lambda: get(f"{agent.observability_url}/readyz")[0] == 200, timeout_s=30)
        text = get(f"{agent.observability_url}/metrics")[1]
        assert metric(text, "tunnel_agent_hub_reconnects_total") == 1
    finally:
        agent.stop()
        own_hub.stop()


async def test_media_metrics_twin_reports_and_desired_streams(
    tmp_path: Path, ca: LocalCA, servers: ThreadLoop, camera: RtspCamera
) -> None:
    own_hub = HubHarness(tmp_path, ca, servers, device_id="twin-cam")
    snaps = tmp_path / "snaps"
    streams = [
        {
            "name": "base",
            "task": "snapshot-to-fs",
            "path": str(snaps / "base"),
            "snapshots_per_second": 2,
        }
    ]
    agent = AgentRunner(
        tmp_path / "agent",
        {
            "hub": {**own_hub.hub_config(), "retry_interval": 1},
            "cameras": [camera_entry(camera, streams=streams)],
            "media": {**FAST_MEDIA, "output_root": str(snaps / "root")},
            "observability": {"listen": f"127.0.0.1:{free_port()}", "twin_report_interval": 1},
        },
    )
    twin = own_hub.link.twin
    interface = dtdl.load_interface(INTERFACE)
    schemas = {name: prop["schema"] for name, prop in dtdl.properties(interface).items()}
    try:
        agent.wait_connected()
        await until(
            lambda: any(m.get("state") == "running" for m in twin.reported.get("media", [])), 30
        )
        reported = twin.reported
        assert reported["agent"]["version"] == __version__
        assert reported["cameras"] == [{"name": "lobby", "ports": [camera.port]}]
        for name in ("agent", "cameras", "openTunnels", "media"):
            assert dtdl.problems(reported[name], schemas[name]) == [], name

        # The source is live: its last packet is well under a few seconds old (and not ahead).
        def packet_age_s() -> float:
            text = scrape(agent.observability_url)
            last = metric(
                text, "tunnel_agent_media_source_last_packet_timestamp_seconds", camera="lobby"
            )
            return float("inf") if last is None else time.time() - last

        await until(lambda: -0.5 <= packet_age_s() < 3, 20)
        text = scrape(agent.observability_url)
        labels = {"camera": "lobby", "stream": "base", "task": "snapshot-to-fs"}
        assert metric(text, "tunnel_agent_media_task_state", **labels, state="running") == 1
        assert metric(text, "tunnel_agent_media_task_state", **labels, state="failed") == 0
        assert (metric(text, "tunnel_agent_media_task_snapshots_total", **labels) or 0) >= 1
        assert (metric(text, "tunnel_agent_media_task_written_bytes_total", **labels) or 0) > 0
        assert metric(text, "tunnel_agent_media_source_up", camera="lobby") == 1
        assert (metric(text, "tunnel_agent_media_source_packets_total", camera="lobby") or 0) > 0
        assert_metrics_sum_correctly(text)

        # The cloud adds a snapshot task: it starts, the base task keeps running.
        desired = [
            {
                "camera": "lobby",
                "streams": [
                    {
                        "name": "base",
                        "task": "snapshot-to-fs",
                        "path": str(snaps / "base"),
                        "snapshots_per_second": 2,
                    },
                    {
                        "name": "added",
                        "taskType": "snapshot-to-fs",
                        "path": "added",
                        "snapshotsPerSecond": 2,
                    },
                ],
            }
        ]
        assert (
            dtdl.problems(
                [
                    {
                        "camera": "lobby",
                        "streams": [
                            StreamSettings.model_validate(s).model_dump(
                                mode="json", exclude_defaults=True
                            )
                            for s in desired[0]["streams"]
                        ],
                    }
                ],
                schemas["mediaStreams"],
            )
            == []
        )
        version = await servers.call(own_hub.link.send_desired({"mediaStreams": desired}))
        await until(lambda: twin.reported.get("mediaStreams", {}).get("av") == version, 30)
        ack = twin.reported["mediaStreams"]
        assert (ack["ac"], ack["value"]) == (200, desired)
        await until(lambda: len(list((snaps / "root" / "added").glob("*.png"))) >= 2, 20)

        # A bad change is refused with the reason, and nothing running is lost.
        bad = [{"camera": "lobby", "streams": [{"name": "x", "task": "clip-to-fs"}]}]
        version = await servers.call(own_hub.link.send_desired({"mediaStreams": bad}))
        await until(lambda: twin.reported.get("mediaStreams", {}).get("av") == version, 30)
        ack = twin.reported["mediaStreams"]
        assert (
            ack["ac"] == 400 and "streams[0]" in ack["ad"] and "clip-to-fs needs path" in ack["ad"]
        )
        count = len(list((snaps / "root" / "added").glob("*.png")))
        await until(lambda: len(list((snaps / "root" / "added").glob("*.png"))) > count, 10)
        assert {m["stream"] for m in twin.reported["media"]} == {"base", "added"}
    finally:
        agent.stop()
        own_hub.stop()


def test_json_log_format(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("[observability]\nenabled = false\n")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tunnel_agent",
            "run",
            "--config",
            str(config),
            "--log-format",
            "json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        first = json.loads(process.stdout.readline())
    finally:
        process.terminate()
        process.wait(10)
    assert (
        first["event"] == "agent.started"
        and first["level"] == "INFO"
        and first["version"] == __version__
    )


@pytest.mark.parametrize("field", sorted(StreamSettings.model_fields))
def test_every_stream_setting_is_in_the_twin_interface(field: str) -> None:
    streams = dtdl.properties(dtdl.load_interface(INTERFACE))["mediaStreams"]["schema"][
        "elementSchema"
    ]["fields"]
    stream_fields = next(f for f in streams if f["name"] == "streams")["schema"]["elementSchema"][
        "fields"
    ]
    assert field in {f["name"] for f in stream_fields}
