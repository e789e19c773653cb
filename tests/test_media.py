"""The media connector with real components: gst-rtsp-server cameras, mosquitto, ffprobe, PyAV."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import av
import psutil
import pytest

from tests.conftest import camera_entry
from tests.support.agent import AgentRunner
from tests.support.camera import RtspCamera
from tests.support.metrics import metric, scrape
from tests.support.mqtt import MediaBroker, Subscriber
from tests.support.waiting import until

FAST = {"watchdog": 3.0, "backoff_initial": 0.5, "backoff_max": 2.0, "status_interval": 2.0}


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MediaBroker]:
    server = MediaBroker(tmp_path_factory.mktemp("media-broker"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def record_camera(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RtspCamera]:
    cam = RtspCamera(tmp_path_factory.mktemp("record-camera"), record_path="/rec")
    yield cam
    cam.stop()


def media_agent(folder: Path, cameras: list[dict[str, Any]], **extra: Any) -> AgentRunner:
    return AgentRunner(
        folder, {"cameras": cameras, "media": {**FAST, **extra.pop("media", {})}, **extra}
    )


def restream_agent(
    folder: Path, camera: RtspCamera, server_port: int, path: str, **media: Any
) -> AgentRunner:
    """An agent re-streaming ``camera`` to a media server on loopback at ``server_port``."""
    stream = {
        "name": "out",
        "task": "stream-to-rtsp",
        "media_server_address": "127.0.0.1",
        "media_server_port": server_port,
        "media_server_path": path,
    }
    return media_agent(folder, [camera_entry(camera, streams=[stream])], media=media)


def metrics_of(agent: AgentRunner) -> str:
    return scrape(agent.observability_url)


def source_states(agent: AgentRunner) -> list[str]:
    return [e["state"] for e in agent.events("media.source_state")]


def mqtt_counter(agent: AgentRunner, name: str) -> int:
    statuses = agent.events("media.mqtt_status")
    return int(statuses[-1].get(name, 0)) if statuses else 0


def decode_image(data: bytes) -> tuple[str, int, int]:
    with av.open(io.BytesIO(data), "r") as container:
        stream = container.streams.video[0]
        frame = next(container.decode(video=0))
        return stream.codec_context.name, frame.width, frame.height


def ffprobe_json(path: Path) -> dict[str, Any]:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-show_format", "-show_streams", "-of", "json", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


async def test_snapshots_to_mqtt_at_the_configured_rate_with_mqtt5_properties(
    tmp_path: Path, broker: MediaBroker, auth_camera: RtspCamera
) -> None:
    stream = {
        "name": "snaps",
        "task": "snapshot-to-mqtt",
        "snapshots_per_second": 2,
        "topic": "site/lobby/jpeg",
        "ttl": 120,
    }
    async with Subscriber(broker.port, "#") as subscriber:
        agent = media_agent(
            tmp_path, [camera_entry(auth_camera, streams=[stream])], mqtt={"url": broker.url}
        )
        try:
            await subscriber.wait_count(1, timeout_s=30)
            start = subscriber.messages[0].at
            # A message after the 10 s window proves the window is over.
            await until(lambda: subscriber.messages[-1].at - start >= 10, 30)
        finally:
            agent.stop()
    in_window = [m for m in subscriber.messages if m.at - start < 10]
    assert 16 <= len(in_window) <= 24, len(in_window)
    assert {m.topic for m in subscriber.messages} == {"site/lobby/jpeg"}
    assert decode_image(subscriber.messages[0].payload) == ("mjpeg", 640, 360)
    properties = subscriber.messages[-1].properties
    assert 0 < properties.MessageExpiryInterval <= 120
    assert properties.ContentType == "image/jpeg"
    user = dict(properties.UserProperty)
    assert user["camera"] == "lobby" and user["stream"] == "snaps"
    assert datetime.fromisoformat(user["capturedAt"].replace("Z", "+00:00")).tzinfo is not None
    sequences = [int(dict(m.properties.UserProperty)["sequence"]) for m in subscriber.messages]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)
    assert auth_camera.password not in agent.output()


async def test_default_topic_and_keyframe_only_decoding(
    tmp_path: Path, broker: MediaBroker, camera: RtspCamera
) -> None:
    stream = {"name": "slow", "task": "snapshot-to-mqtt", "snapshots_per_second": 0.5}
    async with Subscriber(broker.port, "azure-iot-operations/data/#") as subscriber:
        agent = media_agent(
            tmp_path, [camera_entry(camera, streams=[stream])], mqtt={"url": broker.url}
        )
        try:
            await subscriber.wait_count(6, timeout_s=40)
            agent.wait_event("media.decode_policy")
        finally:
            agent.stop()
    assert subscriber.messages[0].topic == "azure-iot-operations/data/lobby/slow"
    assert agent.events("media.decode_policy")[0]["keyframes_only"] == "True"
    final = agent.events("media.source_status")[-1]
    assert (
        int(final["frames_decoded"]) < int(final["packets"]) / 4
    )  # keyframes only, after the first 1 s


async def test_snapshots_and_clips_to_files(tmp_path: Path, camera: RtspCamera) -> None:
    snaps, mp4, mkv = tmp_path / "snaps", tmp_path / "mp4", tmp_path / "mkv"
    streams = [
        {"name": "snaps", "task": "snapshot-to-fs", "path": str(snaps), "snapshots_per_second": 1},
        {"name": "mp4", "task": "clip-to-fs", "path": str(mp4), "format": "mp4", "duration": 3},
        {"name": "mkv", "task": "clip-to-fs", "path": str(mkv), "duration": 3},
    ]
    agent = media_agent(tmp_path / "agent", [camera_entry(camera, streams=streams)])
    try:
        agent.wait_event("media.clip_written", count=6, timeout_s=40)
    finally:
        assert agent.stop() == 0
    pngs = sorted(snaps.iterdir())
    assert len(pngs) >= 5
    assert all(
        p.suffix == ".png" and decode_image(p.read_bytes()) == ("png", 640, 360) for p in pngs
    )
    for folder, format_name in ((mp4, "mov,mp4,m4a,3gp,3g2,mj2"), (mkv, "matroska,webm")):
        clips = sorted(folder.iterdir())
        assert not [c for c in clips if c.name.startswith(".")], (
            "temporary files left after a clean stop"
        )
        for clip in clips[:-1]:  # the last one was cut short by the stop
            info = ffprobe_json(clip)
            assert info["format"]["format_name"] == format_name
            assert [s["codec_name"] for s in info["streams"]] == ["h264"]
            assert (
                3.0 - 0.1 <= float(info["format"]["duration"]) <= 3.0 + 1.0 + 0.1
            )  # one keyframe interval
        first = clips[0].read_bytes()
        if folder == mp4:
            assert first.index(b"moov") < first.index(b"mdat")  # index at the front
    names = [c.name for c in sorted(mkv.iterdir())]
    assert all(re.fullmatch(r"mkv-\d{8}T\d{6}\.\d{3}Z-\d{6}\.mkv", n) for n in names), names
    stamps = [datetime.strptime(n[4:23], "%Y%m%dT%H%M%S.%f") for n in names]
    assert stamps == sorted(stamps)
    assert [int(n[-10:-4]) for n in names] == list(range(1, len(names) + 1))


async def test_a_clip_killed_mid_way_is_salvaged_at_the_next_start(
    tmp_path: Path, camera: RtspCamera
) -> None:
    clips = tmp_path / "clips"
    streams = [
        {"name": "c", "task": "clip-to-fs", "path": str(clips), "format": "mp4", "duration": 4}
    ]
    agent = media_agent(tmp_path / "agent", [camera_entry(camera, streams=streams)])
    try:
        agent.wait_event("media.clip_written", count=1, timeout_s=30)
        # in the middle of the next clip, once a few fragments are on disk
        agent.process.wait_for(
            lambda _: any(p.stat().st_size > 50_000 for p in clips.glob(".*.partial")), 20
        )
    finally:
        agent.kill()

    finals = [p for p in clips.iterdir() if not p.name.startswith(".")]
    (partial,) = [p for p in clips.iterdir() if p.name.startswith(".")]
    for clip in finals:
        assert ffprobe_json(clip)["streams"][0]["codec_name"] == "h264"

    again = media_agent(tmp_path / "again", [camera_entry(camera, streams=streams)])
    try:
        (salvaged,) = again.wait_event("media.partial_clip_salvaged", timeout_s=30)
    finally:
        again.stop()
    assert not partial.exists()
    kept = clips / salvaged["file"]
    assert partial.name == f".{kept.name}.partial"
    info = ffprobe_json(kept)
    assert info["streams"][0]["codec_name"] == "h264"
    assert 0.5 < float(info["format"]["duration"]) <= 4.0 + 1.0
    assert int(salvaged["packets"]) > 7


async def test_restream_to_an_rtsp_record_mount(
    tmp_path: Path, camera: RtspCamera, record_camera: RtspCamera
) -> None:
    before = record_camera.recorded_frames()
    stream = {
        "name": "out",
        "task": "stream-to-rtsp",
        "media_server_address": "127.0.0.1",
        "media_server_port": record_camera.port,
        "media_server_path": "rec",
    }
    agent = media_agent(tmp_path, [camera_entry(camera, streams=[stream])])
    try:
        record_camera.process.wait_for(
            lambda _: record_camera.recorded_frames() > before + 45, timeout_s=30
        )
    finally:
        agent.stop()
    assert agent.events("media.restream_connected")


async def test_rtsps_to_an_untrusted_server_is_refused(tmp_path: Path, camera: RtspCamera) -> None:
    import trustme

    stranger = trustme.CA()
    pem = tmp_path / "server.pem"
    leaf = stranger.issue_cert("127.0.0.1")
    pem.write_bytes(
        b"".join(b.bytes() for b in leaf.cert_chain_pems) + leaf.private_key_pem.bytes()
    )
    server = RtspCamera(tmp_path, record_path="/rec", extra=["--tls-cert", str(pem)])
    try:
        stream = {
            "name": "out",
            "task": "stream-to-rtsps",
            "media_server_address": "127.0.0.1",
            "media_server_port": server.port,
            "media_server_path": "rec",
        }
        agent = media_agent(tmp_path / "agent", [camera_entry(camera, streams=[stream])])
        try:
            agent.process.wait_for(
                lambda _: any(e.get("state") == "failed" for e in agent.events("media.task_state")),
                30,
            )
        finally:
            agent.stop()
        (failed, *_) = [e for e in agent.events("media.task_state") if e.get("state") == "failed"]
        assert failed["stream"] == "out"
        assert failed["reason"].startswith(f"cannot publish to rtsps://127.0.0.1:{server.port}/rec")
        assert not agent.events("media.restream_connected")
        assert server.recorded_frames() == 0
    finally:
        server.stop()


async def test_tasks_recover_when_the_camera_restarts(tmp_path: Path, broker: MediaBroker) -> None:
    cam = RtspCamera(tmp_path / "cam1")
    port = cam.port
    stream = {
        "name": "s",
        "task": "snapshot-to-mqtt",
        "snapshots_per_second": 2,
        "topic": "restart/s",
    }
    async with Subscriber(broker.port, "restart/s") as subscriber:
        agent = media_agent(
            tmp_path / "agent",
            [{"name": "c", "url": cam.url(), "streams": [stream]}],
            mqtt={"url": broker.url},
        )
        try:
            await subscriber.wait_count(3, timeout_s=30)
            before = metrics_of(agent)
            cam.stop()
            # Down for good: the source backed off, tried again and failed again.
            agent.process.wait_for(lambda _: source_states(agent).count("backing off") >= 2, 30)
            seen = len(subscriber.messages)
            cam = RtspCamera(tmp_path / "cam2", port=port)
            await subscriber.wait_count(seen + 3, timeout_s=40)
            after = metrics_of(agent)
        finally:
            agent.stop()
            cam.stop()
    states = source_states(agent)
    assert states[states.index("backing off") :].count("running") >= 1
    assert metric(before, "tunnel_agent_mqtt_connected") == 1
    assert metric(before, "tunnel_agent_media_source_up", camera="c") == 1
    reconnects = "tunnel_agent_media_source_reconnects_total"
    assert (metric(after, reconnects, camera="c") or 0) > (
        metric(before, reconnects, camera="c") or 0
    )
    packets = metric(after, "tunnel_agent_media_source_packets_total", camera="c")
    assert packets is not None and packets > 30
    published = metric(after, "tunnel_agent_mqtt_messages_total", outcome="published")
    assert published is not None and published >= len(subscriber.messages) - 1


async def test_a_frozen_camera_trips_the_watchdog(tmp_path: Path) -> None:
    cam = RtspCamera(tmp_path / "cam")
    stream = {
        "name": "s",
        "task": "snapshot-to-fs",
        "path": str(tmp_path / "out"),
        "snapshots_per_second": 1,
    }
    agent = media_agent(tmp_path / "agent", [{"name": "c", "url": cam.url(), "streams": [stream]}])
    try:
        agent.process.wait_for(
            lambda _: any(e.get("state") == "running" for e in agent.events("media.source_state")),
            30,
        )
        os.kill(cam.process.pid, signal.SIGSTOP)
        agent.process.wait_for(
            lambda _: any(
                e.get("state") == "backing off" for e in agent.events("media.source_state")
            ),
            20,
        )
        os.kill(cam.process.pid, signal.SIGCONT)
        agent.process.wait_for(
            lambda _: [e.get("state") for e in agent.events("media.source_state")][-1] == "running",
            40,
        )
    finally:
        os.kill(cam.process.pid, signal.SIGCONT)
        agent.stop()
        cam.stop()


async def test_broker_outage_is_bounded_counted_and_recovered(
    tmp_path: Path, camera: RtspCamera
) -> None:
    server = MediaBroker(tmp_path)
    stream = {
        "name": "s",
        "task": "snapshot-to-mqtt",
        "snapshots_per_second": 4,
        "topic": "outage/s",
    }
    agent = media_agent(
        tmp_path / "agent",
        [camera_entry(camera, streams=[stream])],
        mqtt={"url": server.url, "queue_size": 8},
    )
    try:
        async with Subscriber(server.port, "outage/s") as subscriber:
            await subscriber.wait_count(4, timeout_s=30)
        assert metric(metrics_of(agent), "tunnel_agent_mqtt_connected") == 1
        rss_before = psutil.Process(agent.process.pid).memory_info().rss
        server.stop()
        # 40 images dropped: at 4 images/s, about 12 s of outage beyond the 8 queued.
        agent.process.wait_for(lambda _: mqtt_counter(agent, "dropped_queue_full") >= 40, 60)
        rss_after = psutil.Process(agent.process.pid).memory_info().rss
        during = metrics_of(agent)
        server.start()
        async with Subscriber(server.port, "outage/s") as subscriber:
            await subscriber.wait_count(4, timeout_s=40)
    finally:
        agent.stop()
        server.stop()
    assert rss_after - rss_before < 16 * 2**20  # the outage did not pile images up
    assert metric(during, "tunnel_agent_mqtt_connected") == 0
    dropped = metric(during, "tunnel_agent_mqtt_messages_total", outcome="dropped_queue_full")
    assert dropped is not None and dropped >= 40
    assert int(agent.events("media.mqtt_status")[-1]["connects"]) >= 2


async def test_images_too_large_for_the_broker_are_counted_not_sent(
    tmp_path: Path, camera: RtspCamera
) -> None:
    server = MediaBroker(tmp_path, max_packet_bytes=4096)
    stream = {"name": "s", "task": "snapshot-to-mqtt", "snapshots_per_second": 2, "topic": "big/s"}
    agent = media_agent(
        tmp_path / "agent", [camera_entry(camera, streams=[stream])], mqtt={"url": server.url}
    )
    try:
        agent.wait_event("media.mqtt_message_too_large", count=2, timeout_s=30)
    finally:
        agent.stop()
        server.stop()
    assert agent.events("media.mqtt_connected")[0]["max_packet_bytes"] == "4096"
    assert int(agent.events("media.mqtt_status")[-1]["dropped_too_large"]) >= 2


async def test_a_failing_task_does_not_stop_the_others(tmp_path: Path, camera: RtspCamera) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where a folder should be")
    streams = [
        {"name": "bad", "task": "snapshot-to-fs", "path": str(blocker / "snaps")},
        {
            "name": "good",
            "task": "snapshot-to-fs",
            "path": str(tmp_path / "good"),
            "snapshots_per_second": 2,
        },
        {
            "name": "full",
            "task": "snapshot-to-fs",
            "path": str(tmp_path / "full"),
            "min_free_bytes": 2**60,
        },
        {
            "name": "kept",
            "task": "snapshot-to-fs",
            "path": str(tmp_path / "kept"),
            "snapshots_per_second": 2,
            "max_files": 3,
        },
    ]
    agent = media_agent(tmp_path / "agent", [camera_entry(camera, streams=streams)])
    try:
        agent.process.wait_for(lambda _: len(list((tmp_path / "good").glob("*.png"))) >= 8, 40)
    finally:
        agent.stop()
    states = {(e["stream"], e["state"]): e for e in agent.events("media.task_state")}
    assert ("bad", "failed") in states and "cannot write to" in states[("bad", "failed")]["reason"]
    assert ("full", "paused") in states and states[("full", "paused")]["reason"].startswith(
        "low disk"
    )
    assert not list((tmp_path / "full").glob("*.png"))
    assert len(list((tmp_path / "kept").glob("*.png"))) == 3


async def test_http_snapshot_source_with_basic_and_digest_auth(tmp_path: Path) -> None:
    from tests.support.http_camera import HttpCamera

    async with HttpCamera("basic") as basic, HttpCamera("digest") as digest:
        cameras = [
            {
                "name": f"http-{cam.scheme}",
                "url": cam.url,
                "username": cam.user,
                "password": cam.password,
                "streams": [
                    {
                        "name": "s",
                        "task": "snapshot-to-fs",
                        "path": str(tmp_path / cam.scheme),
                        "snapshots_per_second": 2,
                        "format": "jpeg",
                    }
                ],
            }
            for cam in (basic, digest)
        ]
        agent = media_agent(tmp_path / "agent", cameras)
        try:
            await asyncio.to_thread(
                agent.process.wait_for,
                lambda _: all(
                    len(list((tmp_path / s).glob("*.jpg"))) >= 3 for s in ("basic", "digest")
                ),
                30,
            )
        finally:
            agent.stop()
        # Each camera challenged the first request, then served the answers to its challenge,
        # and the Digest camera never saw the password in clear.
        for cam in (basic, digest):
            assert cam.answers[0] == 401 and cam.answers[-1] == 200
            served_from = cam.answers.index(200)
            assert served_from <= 2 and set(cam.answers[served_from:]) == {200}, cam.answers
        assert digest.basic_passwords_seen == 0
    jpgs = list((tmp_path / "digest").glob("*.jpg"))
    assert jpgs[0].read_bytes() == digest.image  # passed through, not re-encoded


async def test_file_and_folder_sources(tmp_path: Path) -> None:
    video = tmp_path / "loop.mkv"
    subprocess.run(
        [
            "ffmpeg",
            "-v",
            "error",
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=320x240:rate=10",
            "-t",
            "2",
            "-c:v",
            "libx264",
            "-g",
            "10",
            "-bf",
            "0",
            "-pix_fmt",
            "yuv420p",
            str(video),
        ],
        check=True,
        timeout=60,
    )
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for index, color in enumerate(("red", "blue")):
        subprocess.run(
            [
                "ffmpeg",
                "-v",
                "error",
                "-f",
                "lavfi",
                "-i",
                f"color=c={color}:size=160x120",
                "-frames:v",
                "1",
                str(pictures / f"{index}.png"),
            ],
            check=True,
            timeout=60,
        )
    cameras = [
        {
            "name": "file",
            "url": f"file://{video}",
            "streams": [
                {
                    "name": "clips",
                    "task": "clip-to-fs",
                    "path": str(tmp_path / "clips"),
                    "duration": 2,
                },
                {
                    "name": "snaps",
                    "task": "snapshot-to-fs",
                    "path": str(tmp_path / "file-snaps"),
                    "snapshots_per_second": 2,
                },
            ],
        },
        {
            "name": "folder",
            "url": f"file://{pictures}/",
            "streams": [
                {
                    "name": "snaps",
                    "task": "snapshot-to-fs",
                    "path": str(tmp_path / "folder-snaps"),
                    "snapshots_per_second": 0,
                },
            ],
        },
    ]
    agent = media_agent(tmp_path / "agent", cameras, media={"folder_image_interval": 0.5})
    try:
        agent.wait_event("media.clip_written", count=3, timeout_s=40)  # the 2 s file, looped
    finally:
        agent.stop()
    clip = sorted((tmp_path / "clips").iterdir())[1]
    info = ffprobe_json(clip)
    assert (
        info["streams"][0]["codec_name"] == "h264"
        and 1.9 <= float(info["format"]["duration"]) <= 3.1
    )
    assert len(list((tmp_path / "file-snaps").glob("*.png"))) >= 4
    folder_snaps = sorted((tmp_path / "folder-snaps").glob("*.png"))
    sizes = {decode_image(p.read_bytes())[1:] for p in folder_snaps}
    assert len(folder_snaps) >= 4 and sizes == {(160, 120)}


async def test_the_tunnel_keeps_working_while_media_tasks_run(
    tmp_path: Path,
    agent_factory: Any,
    hub: Any,
    camera: RtspCamera,
    endpoint: Any,
    servers: Any,
) -> None:
    from tests.test_tunnel_video import ffprobe

    streams = [
        {
            "name": "snaps",
            "task": "snapshot-to-fs",
            "path": str(tmp_path / "snaps"),
            "snapshots_per_second": 2,
        },
        {"name": "clips", "task": "clip-to-fs", "path": str(tmp_path / "clips"), "duration": 2},
    ]
    agent = agent_factory([camera_entry(camera, streams=streams)], extra={"media": FAST})
    agent.wait_event("media.clip_written", timeout_s=30)
    for _ in range(3):
        session = await servers.call(endpoint.new_session())
        status, _ = await hub.tunnel_open(
            endpoint.url(f"/tunnel/{session.id}"), session.token, camera.port
        )
        assert status == 200
        info = await ffprobe(f"rtsp://127.0.0.1:{session.consumer_port}/test")
        assert info["streams"][0]["codec_name"] == "h264"
    before = len(list((tmp_path / "snaps").glob("*.png")))
    await until(lambda: len(list((tmp_path / "snaps").glob("*.png"))) > before, 20)
    assert len(agent.events("tunnel.closed")) == 3


async def test_a_second_client_resetting_the_camera_clock_does_not_stall_tasks(
    tmp_path: Path,
) -> None:
    """A seekable shared stream restarts its timestamps when a second client PLAYs from 0."""
    cam = RtspCamera(tmp_path / "cam", extra=["--seek-on-play"])
    clips = tmp_path / "clips"
    streams = [{"name": "c", "task": "clip-to-fs", "path": str(clips), "duration": 2}]
    agent = media_agent(tmp_path / "agent", [{"name": "c", "url": cam.url(), "streams": streams}])
    try:
        # Four 2 s clips: the agent's timestamps run well ahead of a fresh client's.
        agent.wait_event("media.clip_written", count=4, timeout_s=40)
        await asyncio.to_thread(decode_frames_for, cam.url(), 20)  # the second client
        written = len(agent.events("media.clip_written"))
        agent.wait_event("media.clip_written", count=written + 2, timeout_s=15)
    finally:
        agent.stop()
        cam.stop()
    dropped = [
        int(e.get("packets_dropped_bad_timestamps", 0)) for e in agent.events("media.source_status")
    ]
    assert max(dropped, default=0) < 30  # not seconds' worth of packets
    assert agent.events("media.timestamps_reset"), "the camera did not reset its clock"
    for clip in sorted(clips.iterdir())[:-1]:
        assert float(ffprobe_json(clip)["format"]["duration"]) <= 2 + 1 + 0.2


def decode_frames_for(url: str, count: int) -> None:
    with av.open(url, options={"rtsp_transport": "tcp"}, timeout=(10, 10)) as container:
        for index, _ in enumerate(container.decode(video=0)):
            if index >= count:
                return
