"""RTSP clients on their default transports through the relay, where UDP cannot reach them.

The consumer lives in a network namespace of its own (tests/support/netns.py): its only way out is
a veth link to the relay's address. The camera, the agent and the relay are on the host; RTP over
UDP that the camera would send goes to the host's loopback and never reaches the consumer, as on
any real network. ffmpeg and GStreamer ask for UDP first; the relay answers 461 and they retry
with interleaved TCP at once. A route with ``protocol = "tcp"`` is the control: the same ffmpeg
gets nothing there. VLC runs too where it can: Debian 12 builds it without live555
(``--disable-live555``), so its ``rtsp://`` client there is the SAT>IP one, which cannot play an
RTSP camera at all, relay or not.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.camera import RtspCamera
from tests.support.net import free_ports
from tests.support.netns import Namespace, available, consumer_namespace
from tests.support.relay_bed import (
    ConnectProcess,
    RelayBed,
    create_session,
    start_bed,
)
from tests.support.tcp_camera import TcpCamera
from tests.support.threadloop import ThreadLoop
from tests.support.waiting import until
from tunnel_agent.cloud.relay.runner import RunningRelay

pytestmark = pytest.mark.skipif(not available(), reason="needs root and iproute2 (as in CI)")
FIRST_FRAME_S = 5.0
CAMERA_USER, CAMERA_PASSWORD = "viewer", "cam-Pa55-word"
NOBODY = 65534


@dataclass
class Topology:
    bed: RelayBed
    ns: Namespace
    relay: RunningRelay
    routes: dict[str, int]
    stub: TcpCamera


@pytest.fixture(scope="module")
def topology(
    tmp_path_factory: pytest.TempPathFactory,
    servers: ThreadLoop,
    camera: RtspCamera,
    digest_camera: RtspCamera,
) -> Iterator[Topology]:
    stub = TcpCamera()
    servers.run(stub.start())
    folder = tmp_path_factory.mktemp("rtsp")
    bed = start_bed(
        folder, servers, {"plain": camera, "digest": digest_camera}, stub_ports=[stub.port]
    )
    try:
        with consumer_namespace() as ns:
            inside = [f"{ns.ip}/32"]
            names = ("rtsp", "digest", "tcp", "bytes", "bytes-rtsp")
            routes = dict(zip(names, free_ports(len(names), ns.host_ip), strict=True))
            relay = bed.start_relay(
                ns.host_ip,
                routes=[
                    {
                        "name": "rtsp",
                        "listen": f"{ns.host_ip}:{routes['rtsp']}",
                        "device_id": "agent-cam",
                        "local_port": camera.port,
                        "allowed_sources": inside,
                    },
                    {
                        "name": "digest",
                        "listen": f"{ns.host_ip}:{routes['digest']}",
                        "device_id": "agent-cam",
                        "local_port": digest_camera.port,
                        "allowed_sources": inside,
                    },
                    {
                        "name": "tcp",
                        "listen": f"{ns.host_ip}:{routes['tcp']}",
                        "device_id": "agent-cam",
                        "local_port": camera.port,
                        "allowed_sources": inside,
                        "protocol": "tcp",
                    },
                    {
                        "name": "bytes",
                        "listen": f"{ns.host_ip}:{routes['bytes']}",
                        "device_id": "agent-cam",
                        "local_port": stub.port,
                        "allowed_sources": ["0.0.0.0/0"],
                        "protocol": "tcp",
                    },
                    {
                        "name": "bytes-rtsp",
                        "listen": f"{ns.host_ip}:{routes['bytes-rtsp']}",
                        "device_id": "agent-cam",
                        "local_port": stub.port,
                        "allowed_sources": ["0.0.0.0/0"],
                    },
                ],
            )
            yield Topology(bed, ns, relay, routes, stub)
    finally:
        bed.close()
        servers.run(stub.stop())


def url(topology: Topology, route: str, *, credentials: bool = False) -> str:
    auth = f"{CAMERA_USER}:{CAMERA_PASSWORD}@" if credentials else ""
    return f"rtsp://{auth}{topology.ns.host_ip}:{topology.routes[route]}/test"


async def run_inside(
    ns: Namespace,
    args: list[str],
    timeout_s: float,
    *,
    user: int | None = None,
    env: dict[str, str] | None = None,
) -> tuple[int | None, str, str, float]:
    """Run a client in the consumer's namespace: (exit status or None if killed, out, err, s)."""
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        *ns.command(args, user=user),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        process.kill()
        out, err = await process.communicate()
        return None, out.decode(), err.decode(), time.monotonic() - started
    finally:
        if process.returncode is None:  # the test was cancelled: the client must not outlive it
            process.kill()
            await process.wait()
    return process.returncode, out.decode(), err.decode(), time.monotonic() - started


def ffmpeg_first_frame(source: str) -> list[str]:
    return ["ffmpeg", "-nostdin", "-v", "error", "-i", source, "-frames:v", "1", "-f", "null", "-"]


def gst_first_frame(source: str, *, credentials: bool = False) -> list[str]:
    auth = [f"user-id={CAMERA_USER}", f"user-pw={CAMERA_PASSWORD}"] if credentials else []
    return [
        "gst-launch-1.0", "-v", "rtspsrc", f"location={source}", *auth, "!", "rtph264depay",
        "!", "h264parse", "!", "avdec_h264", "!", "fakesink", "silent=false", "num-buffers=1",
    ]  # fmt: skip


def gst_got_a_frame(status: int | None, out: str, err: str) -> bool:
    """A decoded frame reached the sink and the pipeline ended.

    Once in a while gst-rtsp-server's shared media closes a client's connection during its PAUSE
    after the frame (also without the relay, with a plain TCP proxy in between): an error in
    ``gst_rtspsrc_pause`` at shutdown is not a failure to play."""
    if "last-message = chain" not in out:
        return False
    return status == 0 or (status == 1 and "gst_rtspsrc_pause" in err)


def steered(topology: Topology) -> int:
    return sum(
        1
        for line in topology.bed.records.events("relay.tunnel_closed")
        if "'setups_refused': 0" not in line and "setups_refused" in line
    )


@pytest.mark.parametrize("route", ["rtsp", "digest"])
async def test_ffmpeg_on_its_default_transport_gets_a_frame_in_time(
    topology: Topology, route: str
) -> None:
    before = steered(topology)
    status, _, err, took = await run_inside(
        topology.ns, ffmpeg_first_frame(url(topology, route, credentials=route == "digest")), 30
    )

    assert status == 0, err
    assert took < FIRST_FRAME_S
    await until(lambda: steered(topology) > before, timeout_s=10)  # it was asked to use TCP


async def test_ffprobe_on_its_default_transport_sees_the_picture(topology: Topology) -> None:
    status, out, err, took = await run_inside(
        topology.ns,
        ["ffprobe", "-v", "error", "-show_streams", "-of", "json", url(topology, "rtsp")],
        30,
    )

    assert status == 0, err
    stream = json.loads(out)["streams"][0]
    assert (stream["codec_name"], stream["width"], stream["height"]) == ("h264", 640, 360)
    assert took < FIRST_FRAME_S + 3  # ffprobe also reads ahead to settle the stream's parameters


@pytest.mark.parametrize("route", ["rtsp", "digest"])
async def test_gstreamer_on_its_default_transport_gets_a_frame_in_time(
    topology: Topology, route: str
) -> None:
    status, out, err, took = await run_inside(
        topology.ns, gst_first_frame(url(topology, route), credentials=route == "digest"), 30
    )

    assert gst_got_a_frame(status, out, err), err
    assert took < FIRST_FRAME_S


async def test_without_steering_the_same_ffmpeg_gets_nothing(topology: Topology) -> None:
    """The control: through a ``protocol = "tcp"`` route, UDP is asked for and never arrives."""
    status, _, _, took = await run_inside(
        topology.ns, ffmpeg_first_frame(url(topology, "tcp")), 2 * FIRST_FRAME_S
    )

    assert status is None  # still waiting for UDP when killed
    assert took >= 2 * FIRST_FRAME_S


async def test_connect_and_a_default_client_in_the_consumers_namespace(
    topology: Topology, tmp_path: Path
) -> None:
    bed, ns = topology.bed, topology.ns
    session = await create_session(bed, topology.relay, allowedSources=[f"{ns.ip}/32"])
    connect = ConnectProcess(
        tmp_path, session["connectUrl"], session["token"], bed.ca_file, prefix=ns.command([])
    )
    try:
        connect.wait_listening()
        local = f"rtsp://127.0.0.1:{connect.port}/test"
        status, _, err, took = await run_inside(ns, ffmpeg_first_frame(local), 30)
        assert status == 0, err
        assert took < FIRST_FRAME_S
        status, out, err, took = await run_inside(ns, gst_first_frame(local), 30)
        assert gst_got_a_frame(status, out, err), err
        assert took < FIRST_FRAME_S
    finally:
        assert connect.stop() == 0


async def test_a_session_address_serves_a_default_client(topology: Topology) -> None:
    bed, ns = topology.bed, topology.ns
    session = await create_session(bed, topology.relay, allowedSources=[f"{ns.ip}/32"])
    status, _, err, took = await run_inside(
        ns, ffmpeg_first_frame(f"rtsp://{session['address']}/test"), 30
    )

    assert status == 0, err
    assert took < FIRST_FRAME_S


def vlc_has_live555() -> bool:
    try:
        listing = subprocess.run(
            [
                "setpriv",
                f"--reuid={NOBODY}",
                f"--regid={NOBODY}",
                "--clear-groups",
                "vlc",
                "--list",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            env={"HOME": "/tmp"},
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return "live555" in listing.stdout


@pytest.mark.skipif(
    not vlc_has_live555(),
    reason="no VLC with live555 here (Debian 12 builds VLC with --disable-live555)",
)
async def test_vlc_on_its_default_transport_records_video(
    topology: Topology, tmp_path: Path
) -> None:
    home = tmp_path / "vlc"
    home.mkdir()
    home.chmod(0o777)
    output = home / "out.ts"
    vlc = ["cvlc", "--intf", "dummy", "--run-time", "5", "--play-and-exit"]
    vlc += ["--sout", f"#file{{dst={output}}}", url(topology, "rtsp"), "vlc://quit"]
    status, _, err, _ = await run_inside(topology.ns, vlc, 60, user=NOBODY, env={"HOME": str(home)})

    assert status == 0, err
    assert output.stat().st_size > 50_000


UDP_SETUP = (
    b"SETUP rtsp://camera/test/stream=0 RTSP/1.0\r\nCSeq: 3\r\n"
    b"Transport: RTP/AVP;unicast;client_port=5000-5001\r\n\r\n"
)


async def test_protocol_tcp_passes_every_byte_through(topology: Topology) -> None:
    """The same bytes a ``rtsp`` route would answer itself reach the camera untouched."""
    payload = UDP_SETUP + bytes(range(256)) * 64 + b"$\x00\x00\x10" + b"\xff" * 16
    stub = topology.stub
    count = len(stub.connections)

    _, writer = await asyncio.open_connection(topology.ns.host_ip, topology.routes["bytes"])
    writer.write(payload)
    await until(lambda: len(stub.connections) > count, timeout_s=15)
    connection = stub.connections[count]
    await until(lambda: len(connection.received) >= len(payload), timeout_s=15)
    writer.close()

    assert bytes(connection.received) == payload


async def test_protocol_rtsp_answers_a_udp_only_setup_itself(topology: Topology) -> None:
    stub = topology.stub
    count = len(stub.connections)
    reader, writer = await asyncio.open_connection(
        topology.ns.host_ip, topology.routes["bytes-rtsp"]
    )
    writer.write(UDP_SETUP)

    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)

    assert answer == b"RTSP/1.0 461 Unsupported Transport\r\nCSeq: 3\r\n\r\n"
    await until(lambda: len(stub.connections) > count, timeout_s=15)
    writer.close()
    await until(stub.connections[count].closed.is_set, timeout_s=15)
    assert bytes(stub.connections[count].received) == b""  # it never reached the camera
