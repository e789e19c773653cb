"""Every media output the README lists, each proven with real files, brokers and servers.

Image and clip formats, retention with real files, MQTT 3.1.1 over TLS with QoS 0 and retain,
RTSPS both ways (a camera source and a media server, verified against the configured CA), and the
one-shot ``tunnel-agent snapshot`` command.
"""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from tests.conftest import camera_entry
from tests.support import toml_writer
from tests.support.agent import AgentRunner
from tests.support.camera import RtspCamera
from tests.support.mqtt import MediaBroker, Subscriber
from tests.test_media import decode_image, ffprobe_json, media_agent
from tunnel_agent.cloud.devhub.certs import LocalCA

CLIP_S = 2.0
FFMPEG_TEST_SOURCE = ["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=320x240:rate=10"]
FFMPEG_TEST_SOURCE += ["-t", "2"]
SNAPSHOT = [sys.executable, "-m", "tunnel_agent", "snapshot"]
KEYFRAME_INTERVAL_S = 1.0  # the test camera: 15 fps, a keyframe every 15 frames
# ffprobe's name for what each clip format the README lists writes.
H264_CLIP_FORMATS = {
    "mkv": "matroska,webm",
    "mp4": "mov,mp4,m4a,3gp,3g2,mj2",
    "mov": "mov,mp4,m4a,3gp,3g2,mj2",
    "avi": "avi",
    "mts": "mpegts",
    "ts": "mpegts",
    "mpg": "mpeg",
    "flv": "flv",
}


def last_status(agent: AgentRunner, stream: str) -> dict[str, Any]:
    statuses = [e for e in agent.events("media.task_status") if e.get("stream") == stream]
    return statuses[-1] if statuses else {}


def counter(agent: AgentRunner, stream: str, name: str) -> int:
    return int(last_status(agent, stream).get(name, 0))


def own_files(folder: Path, extension: str) -> list[Path]:
    return sorted(p for p in folder.glob(f"*.{extension}") if not p.name.startswith("."))


def clip_stream(fmt: str, folder: Path) -> dict[str, Any]:
    return {
        "name": fmt,
        "task": "clip-to-fs",
        "format": fmt,
        "path": str(folder),
        "duration": CLIP_S,
    }


def make_video(path: Path, codec_args: list[str]) -> Path:
    subprocess.run(
        [*FFMPEG_TEST_SOURCE, *codec_args, str(path)],
        check=True,
        timeout=60,
    )
    return path


def rtsps_pem(ca: LocalCA, name: str) -> Path:
    """Certificate and key in one PEM file, as the test camera's --tls-cert wants them."""
    pair = ca.issue(name, ["127.0.0.1"])
    pem = pair.cert_file.with_name(f"{name}-with-key.pem")
    pem.write_bytes(pair.cert_file.read_bytes() + pair.key_file.read_bytes())
    return pem


async def test_bmp_and_tiff_snapshots_kept_by_bytes_and_by_age(
    tmp_path: Path, camera: RtspCamera
) -> None:
    bmp_bytes = 640 * 360 * 3 + 54  # 24-bit BMP of the test camera's frame
    max_bytes = 3 * bmp_bytes + 1000
    max_age_s = 1.5
    streams = [
        {
            "name": "bmp",
            "task": "snapshot-to-fs",
            "format": "bmp",
            "path": str(tmp_path / "bmp"),
            "snapshots_per_second": 2,
            "max_bytes": max_bytes,
        },
        {
            "name": "tiff",
            "task": "snapshot-to-fs",
            "format": "tiff",
            "path": str(tmp_path / "tiff"),
            "snapshots_per_second": 2,
            "max_age": max_age_s,
        },
    ]
    agent = media_agent(tmp_path / "agent", [camera_entry(camera, streams=streams)])
    try:
        agent.process.wait_for(
            lambda _: all(counter(agent, s, "deleted_by_retention") >= 3 for s in ("bmp", "tiff")),
            60,
        )
    finally:
        agent.stop()

    bmps = own_files(tmp_path / "bmp", "bmp")
    assert 1 <= len(bmps) <= 3
    assert sum(p.stat().st_size for p in bmps) <= max_bytes
    assert {decode_image(p.read_bytes()) for p in bmps} == {("bmp", 640, 360)}
    tiffs = own_files(tmp_path / "tiff", "tiff")
    assert tiffs
    assert {decode_image(p.read_bytes()) for p in tiffs} == {("tiff", 640, 360)}
    ages = [p.stat().st_mtime for p in tiffs]
    assert max(ages) - min(ages) <= max_age_s + 0.5 + 0.2  # the age limit, one interval, slack


async def test_every_clip_format_the_readme_lists(tmp_path: Path, camera: RtspCamera) -> None:
    """H.264 in each container that can hold it; WebM and MJPEG from sources of their codecs."""
    h264 = [clip_stream(fmt, tmp_path / fmt) for fmt in H264_CLIP_FORMATS]
    vp9 = make_video(
        tmp_path / "vp9.mkv", ["-c:v", "libvpx-vp9", "-g", "10", "-deadline", "realtime"]
    )
    mjpeg = make_video(tmp_path / "mjpeg.mkv", ["-c:v", "mjpeg", "-q:v", "5"])
    cameras = [
        camera_entry(camera, streams=h264),
        {
            "name": "vp9",
            "url": f"file://{vp9}",
            "streams": [clip_stream("webm", tmp_path / "webm")],
        },
        {
            "name": "mjpeg",
            "url": f"file://{mjpeg}",
            "streams": [clip_stream("mjpeg", tmp_path / "mjpeg")],
        },
    ]
    names = [*H264_CLIP_FORMATS, "webm", "mjpeg"]
    agent = media_agent(tmp_path / "agent", cameras)

    def written(stream: str) -> int:
        return sum(1 for e in agent.events("media.clip_written") if e.get("stream") == stream)

    try:
        agent.process.wait_for(lambda _: all(written(n) >= 2 for n in names), 90)
    finally:
        agent.stop()

    for fmt, format_name in H264_CLIP_FORMATS.items():
        clips = own_files(tmp_path / fmt, fmt)
        assert len(clips) >= 2, fmt
        for clip in clips[:-1]:  # the last one was cut short by the stop
            info = ffprobe_json(clip)
            assert info["format"]["format_name"] == format_name, fmt
            assert [s["codec_name"] for s in info["streams"]] == ["h264"], fmt
            duration = float(info["format"]["duration"])
            assert CLIP_S - 0.2 <= duration <= CLIP_S + KEYFRAME_INTERVAL_S + 0.2, (fmt, duration)
    for fmt, codec in (("webm", "vp9"), ("mjpeg", "mjpeg")):
        clips = own_files(tmp_path / fmt, fmt)
        assert len(clips) >= 2, fmt
        assert [s["codec_name"] for s in ffprobe_json(clips[0])["streams"]] == [codec]


async def test_a_clip_format_that_cannot_hold_the_codec_fails_the_task_saying_why(
    tmp_path: Path, camera: RtspCamera
) -> None:
    stream = clip_stream("webm", tmp_path / "webm")
    agent = media_agent(tmp_path / "agent", [camera_entry(camera, streams=[stream])])
    try:
        agent.process.wait_for(
            lambda _: any(e.get("state") == "failed" for e in agent.events("media.task_state")),
            30,
        )
    finally:
        agent.stop()
    (failed, *_) = [e for e in agent.events("media.task_state") if e.get("state") == "failed"]
    assert "'webm' format does not support" in failed["reason"], failed  # FFmpeg's own words
    assert not own_files(tmp_path / "webm", "webm")


async def test_snapshots_over_mqtt_3_1_1_and_tls_with_qos_0_and_retain(
    tmp_path: Path, camera: RtspCamera, ca: LocalCA
) -> None:
    broker = MediaBroker(tmp_path, tls=ca.issue("mqtts-broker", ["127.0.0.1"]), log_all=True)
    tls = ssl.create_default_context(cafile=str(ca.cert_file))
    stream = {
        "name": "s",
        "task": "snapshot-to-mqtt",
        "snapshots_per_second": 2,
        "topic": "v311/s",
        "qos": 0,
        "retain": True,
    }
    mqtt = {"url": broker.url, "ca_file": str(ca.cert_file), "protocol": 3, "client_id": "v311-cam"}
    agent = media_agent(tmp_path / "agent", [camera_entry(camera, streams=[stream])], mqtt=mqtt)
    try:
        agent.wait_event("media.mqtt_connected")
        agent.process.wait_for(lambda _: "Received PUBLISH from v311-cam" in broker.log(), 30)
        # A subscriber that comes later gets the last image at once: it was retained.
        async with Subscriber(
            broker.port, "v311/s", tls_context=tls, protocol=aiomqtt.ProtocolVersion.V311
        ) as late:
            await late.wait_count(1, timeout_s=10)
    finally:
        agent.stop()
        broker.stop()
    first = late.messages[0]
    assert first.retain and first.qos == 0
    assert decode_image(first.payload) == ("mjpeg", 640, 360)
    log = broker.log()
    assert "New client connected from 127.0.0.1" in log and "as v311-cam (p2," in log  # 3.1.1
    assert "Received PUBLISH from v311-cam (d0, q0, r1, m0, 'v311/s'" in log


async def test_rtsps_camera_verified_against_its_ca_file(tmp_path: Path, ca: LocalCA) -> None:
    cam = RtspCamera(tmp_path / "cam", extra=["--tls-cert", str(rtsps_pem(ca, "rtsps-camera"))])
    url = f"rtsps://127.0.0.1:{cam.port}/test"
    snapshots = {"task": "snapshot-to-fs", "snapshots_per_second": 2}
    cameras = [
        {
            "name": "trusted",
            "url": url,
            "ca_file": str(ca.cert_file),
            "streams": [{"name": "s", "path": str(tmp_path / "trusted"), **snapshots}],
        },
        {  # the same server, without the CA: not in the system store, so refused
            "name": "untrusted",
            "url": url,
            "streams": [{"name": "s", "path": str(tmp_path / "untrusted"), **snapshots}],
        },
    ]
    agent = media_agent(tmp_path / "agent", cameras)
    try:
        agent.process.wait_for(
            lambda _: (
                len(own_files(tmp_path / "trusted", "png")) >= 3
                and any(
                    e.get("camera") == "untrusted" and e.get("state") == "backing off"
                    for e in agent.events("media.source_state")
                )
            ),
            40,
        )
    finally:
        agent.stop()
        cam.stop()
    assert decode_image(own_files(tmp_path / "trusted", "png")[0].read_bytes()) == (
        "png",
        640,
        360,
    )
    assert not own_files(tmp_path / "untrusted", "png")
    running = {e["camera"] for e in agent.events("media.source_state") if e["state"] == "running"}
    assert running == {"trusted"}


async def test_stream_to_rtsps_with_credentials_and_the_servers_ca(
    tmp_path: Path, camera: RtspCamera, ca: LocalCA
) -> None:
    server = RtspCamera(
        tmp_path / "server",
        record_path="/rec",
        user="publisher",
        password="Pub-Secret-31",
        extra=["--tls-cert", str(rtsps_pem(ca, "rtsps-server"))],
    )
    base = {
        "task": "stream-to-rtsps",
        "media_server_address": "127.0.0.1",
        "media_server_port": server.port,
        "media_server_path": "rec",
        "media_server_ca_file": str(ca.cert_file),
    }
    user = {"media_server_username": "publisher"}
    streams = [
        {"name": "out", **base, **user, "media_server_password": "Pub-Secret-31"},
        {"name": "wrong", **base, **user, "media_server_password": "Not-The-Password"},
    ]
    agent = media_agent(tmp_path / "agent", [camera_entry(camera, streams=streams)])
    try:
        server.process.wait_for(lambda _: server.recorded_frames() > 45, timeout_s=40)
        agent.process.wait_for(
            lambda _: any(
                e.get("stream") == "wrong" and e.get("state") == "failed"
                for e in agent.events("media.task_state")
            ),
            30,
        )
    finally:
        agent.stop()
        server.stop()
    (connected,) = agent.events("media.restream_connected")
    assert connected["stream"] == "out"
    assert connected["codec"] == "h264"
    assert connected["server"] == f"rtsps://publisher:***@127.0.0.1:{server.port}/rec"
    (refused, *_) = [
        e
        for e in agent.events("media.task_state")
        if e["stream"] == "wrong" and e["state"] == "failed"
    ]
    assert refused["reason"].startswith("cannot publish to rtsps://publisher:***@127.0.0.1")
    text = agent.output()
    assert "Pub-Secret-31" not in text and "Not-The-Password" not in text


@pytest.mark.parametrize("extension", ["jpg", "png", "bmp", "tiff"])
def test_the_snapshot_command_takes_one_image(
    tmp_path: Path, auth_camera: RtspCamera, extension: str
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(toml_writer.dumps({"cameras": [camera_entry(auth_camera)]}))
    output = tmp_path / f"lobby.{extension}"

    result = subprocess.run(
        [*SNAPSHOT, "--config", str(config), "--camera", "lobby", "-o", str(output)],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{output} (640x360)"
    codec = {"jpg": "mjpeg"}.get(extension, extension)
    assert decode_image(output.read_bytes()) == (codec, 640, 360)
    assert auth_camera.password not in result.stdout + result.stderr


def test_the_snapshot_command_names_what_is_wrong(tmp_path: Path, camera: RtspCamera) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(toml_writer.dumps({"cameras": [camera_entry(camera)]}))

    def snapshot(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*SNAPSHOT, "--config", str(config), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    unknown = snapshot("--camera", "door", "-o", str(tmp_path / "x.jpg"))
    assert unknown.returncode == 2
    assert "no camera 'door' (configured: lobby)" in unknown.stderr
    bad_format = snapshot("--camera", "lobby", "-o", str(tmp_path / "x.gif"))
    assert bad_format.returncode == 1
    assert "cannot tell the image format from 'x.gif'" in bad_format.stderr
    assert not (tmp_path / "x.gif").exists()
    assert "Traceback" not in unknown.stderr + bad_format.stderr
