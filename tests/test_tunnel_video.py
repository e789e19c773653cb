"""Video really flows: camera -> agent -> WebSocket -> endpoint -> ffprobe / PyAV, over the hub."""

from __future__ import annotations

import asyncio
import json
import re

import av

from tests.conftest import AgentFactory, camera_entry
from tests.support.camera import RtspCamera
from tests.support.hub import HubHarness
from tests.support.threadloop import ThreadLoop
from tests.support.ws_endpoint import TunnelEndpoint

USER_AGENT = re.compile(r"^tunnel-agent/\d+\.\d+\.\d+\S* \(Linux [^;]+; [^)]+\)( \S+/\S+)?$")


async def ffprobe(url: str, timeout_s: float = 30.0) -> dict[str, object]:
    process = await asyncio.create_subprocess_exec(
        "ffprobe",
        "-v",
        "error",
        "-rtsp_transport",
        "tcp",
        "-show_streams",
        "-of",
        "json",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout_s)
    finally:
        if process.returncode is None:  # timed out or cancelled: ffprobe must not outlive it
            process.kill()
            await process.wait()
    assert process.returncode == 0, err.decode()
    return json.loads(out)  # type: ignore[no-any-return]


def decode_frames(url: str, count: int) -> list[tuple[int, int]]:
    """Decode ``count`` frames with PyAV over RTSP/TCP and return their sizes."""
    sizes = []
    with av.open(
        url, options={"rtsp_transport": "tcp", "timeout": "10000000"}, timeout=(10, 10)
    ) as container:
        for frame in container.decode(video=0):
            sizes.append((frame.width, frame.height))
            if len(sizes) >= count:
                break
    return sizes


async def test_ffprobe_sees_h264_through_the_tunnel(
    agent_factory: AgentFactory,
    hub: HubHarness,
    camera: RtspCamera,
    endpoint: TunnelEndpoint,
    servers: ThreadLoop,
) -> None:
    agent = agent_factory([camera_entry(camera, make="Contoso", model="C-100")])
    session = await servers.call(endpoint.new_session())

    status, body = await hub.tunnel_open(
        endpoint.url(f"/tunnel/{session.id}"), session.token, camera.port
    )

    assert status == 200, body
    assert re.fullmatch(r"[0-9a-f]{12}", body["tunnelId"])
    assert session.headers["Authorization"] == f"Bearer {session.token}"
    assert session.headers["TunnelConnectionSource"] == "PnpDevice"
    assert USER_AGENT.match(session.headers["User-Agent"]), session.headers["User-Agent"]
    assert session.headers["User-Agent"].endswith(" Contoso/C-100")

    info = await ffprobe(f"rtsp://127.0.0.1:{session.consumer_port}/test")

    video = [s for s in info["streams"] if s["codec_type"] == "video"]  # type: ignore[index, union-attr]
    assert video and video[0]["codec_name"] == "h264"
    assert (video[0]["width"], video[0]["height"]) == (640, 360)
    closed = agent.wait_event("tunnel.closed")[0]
    assert closed["tunnel"] == body["tunnelId"]
    assert closed["camera"] == "lobby"
    # Every byte the consumer got came through the agent (all it sent, but what was still in
    # flight when the consumer hung up), and every byte the consumer sent reached the camera.
    assert session.counters.to_consumer > 2_000
    assert int(closed["bytes_to_remote"]) >= session.counters.to_consumer
    assert int(closed["bytes_to_camera"]) == session.counters.to_device > 100


async def test_pyav_decodes_frames_from_a_camera_with_basic_auth(
    agent_factory: AgentFactory,
    hub: HubHarness,
    auth_camera: RtspCamera,
    endpoint: TunnelEndpoint,
    servers: ThreadLoop,
) -> None:
    agent_factory([camera_entry(auth_camera)])
    session = await servers.call(endpoint.new_session())

    status, body = await hub.tunnel_open(
        endpoint.url(f"/tunnel/{session.id}"), session.token, auth_camera.port
    )
    assert status == 200, body

    url = auth_camera.url(with_credentials=True, port=session.consumer_port)
    sizes = await asyncio.to_thread(decode_frames, url, 30)

    assert sizes == [(640, 360)] * 30
    assert session.counters.to_consumer > 20_000
