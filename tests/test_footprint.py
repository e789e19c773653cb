"""What a configuration does not use is not loaded (seen in the running agent), glibc's allocator
is limited by the agent itself, and the small HTTP endpoint that replaced aiohttp's server for
observability holds up to bad clients."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import av
import pytest

from tests.conftest import camera_entry
from tests.support.agent import AgentRunner
from tests.support.camera import RtspCamera
from tests.support.hub import HubHarness
from tests.support.net import free_port
from tests.support.threadloop import ThreadLoop
from tests.support.waiting import until
from tests.test_observability import get
from tunnel_agent import malloc
from tunnel_agent.cloud.devhub.certs import LocalCA
from tunnel_agent.media.encode import ImageEncoder
from tunnel_agent.observability import server as observability_server
from tunnel_agent.observability.server import ObservabilityServer, parse_request_line


def loaded(agent: AgentRunner) -> dict[str, bool]:
    status = json.loads(get(f"{agent.observability_url}/status")[1])
    libraries: dict[str, bool] = status["process"]["libraries_loaded"]
    assert status["process"]["rss_bytes"] > 0
    return libraries


async def test_media_libraries_load_only_when_a_stream_needs_them(
    tmp_path: Path, ca: LocalCA, servers: ThreadLoop, camera: RtspCamera
) -> None:
    own_hub = HubHarness(tmp_path, ca, servers, device_id="lazy-cam")
    agent = AgentRunner(
        tmp_path / "agent",
        {
            "hub": own_hub.hub_config(),
            "cameras": [camera_entry(camera)],
            "media": {"output_root": str(tmp_path / "media")},
            "observability": {"listen": f"127.0.0.1:{free_port()}", "twin_report_interval": 1},
        },
    )
    snaps = tmp_path / "media" / "snaps"
    try:
        agent.wait_connected()
        nothing = {"av": False, "aiohttp": False, "aiomqtt": False, "requests": False}
        assert loaded(agent) == nothing

        # The cloud gives the camera a snapshot task: PyAV is loaded then, and only PyAV.
        stream = {"name": "s", "taskType": "snapshot-to-fs", "path": "snaps"}
        desired = [{"camera": "lobby", "streams": [stream | {"snapshotsPerSecond": 2}]}]
        twin = own_hub.link.twin
        version = await servers.call(own_hub.link.send_desired({"mediaStreams": desired}))
        await until(lambda: twin.reported.get("mediaStreams", {}).get("av") == version, 30)
        assert twin.reported["mediaStreams"]["ac"] == 200
        await until(lambda: any(snaps.glob("*.png")), 30)
        assert loaded(agent) == nothing | {"av": True}
    finally:
        agent.stop()
        own_hub.stop()


def test_the_agent_limits_malloc_arenas_itself_and_the_environment_wins(
    tmp_path: Path, ca: LocalCA, hub: HubHarness
) -> None:
    """Each thread that allocates gets an arena of its own unless the limit holds: the agent has
    more threads than the limit, and one started with ``MALLOC_ARENA_MAX=8`` shows the count the
    limit prevents (glibc read the variable; the agent left the parameter alone)."""
    agents = {
        env: AgentRunner(
            tmp_path / f"agent-{index}",
            {
                "hub": {**hub.hub_config(), "connection_string": hub.add_device(f"malloc-{index}")},
                "cameras": [{"name": "lobby", "host": "127.0.0.1", "ports": [free_port()]}],
            },
            env={"MALLOC_ARENA_MAX": env} if env else None,
        )
        for index, env in enumerate(("", "8"))
    }
    try:
        for agent in agents.values():
            agent.wait_connected()
        statuses = {
            env: json.loads(get(f"{agent.observability_url}/status")[1])["process"]
            for env, agent in agents.items()
        }
        own, from_env = statuses[""]["malloc"], statuses["8"]["malloc"]
        threads = len(list(Path(f"/proc/{agents[''].process.pid}/task").iterdir()))
        assert own == {
            "arena_max": malloc.ARENA_MAX,
            "mmap_threshold_bytes": malloc.MMAP_THRESHOLD_BYTES,
            "trim_threshold_bytes": malloc.TRIM_THRESHOLD_BYTES,
            "arenas": own["arenas"],
        }
        assert 1 <= own["arenas"] <= malloc.ARENA_MAX < threads
        assert from_env["arena_max"] is None
        assert from_env["mmap_threshold_bytes"] == malloc.MMAP_THRESHOLD_BYTES
        assert from_env["arenas"] > malloc.ARENA_MAX
    finally:
        for agent in agents.values():
            agent.stop()


SDK_CHECK = """
import asyncio, base64, json, sys
from tunnel_agent.hub import sdk
from azure.iot.device.iothub import pipeline

report = {"requests_at_import": "requests" in sys.modules}
key = base64.b64encode(b"k" * 32).decode()
text = f"HostName=hub.example;DeviceId=d;SharedAccessKey={key}"
client = sdk.mqtt_only(
    lambda: sdk.IoTHubDeviceClient.create_from_connection_string(text, product_info="dtmi:x;1")
)
report["http_pipeline"] = type(client._http_pipeline).__name__
report["sdk_name_restored"] = pipeline.HTTPPipeline.__module__
report["requests_after_client"] = "requests" in sys.modules
try:
    asyncio.run(client.get_storage_info_for_blob("b"))
except AttributeError as exc:
    report["blob_upload"] = str(exc)
edge = sys.modules["azure.iot.device.iothub.edge_hsm"]
report["edge_hsm_runs_when_used"] = edge.IoTEdgeHsm.__name__
report["requests_after_edge"] = "requests" in sys.modules
print(json.dumps(report))
"""


def test_the_iot_sdk_comes_without_requests_and_its_lazy_parts_still_run_when_used() -> None:
    """A fresh interpreter: the SDK without requests, the agent's client without an HTTP
    pipeline (the SDK's own name put back), and a lazily loaded module that runs in full on use."""
    done = subprocess.run(
        [sys.executable, "-c", SDK_CHECK], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(done.stdout) == {
        "requests_at_import": False,
        "http_pipeline": "NoHttpPipeline",
        "sdk_name_restored": "azure.iot.device.iothub.pipeline.http_pipeline",
        "requests_after_client": False,
        "blob_upload": "the agent's IoT Hub client has no HTTP pipeline"
        " (asked for get_storage_info_for_blob)",
        "edge_hsm_runs_when_used": "IoTEdgeHsm",
        "requests_after_edge": True,
    }


def test_malloc_parameters_set_in_the_environment_are_left_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.check=0:glibc.malloc.mmap_threshold=65536")
    assert malloc.tune() == malloc.MallocSettings()


def test_images_are_encoded_on_the_calling_thread_alone() -> None:
    """FFmpeg's default of a thread per core gives each mjpeg slice thread a copy of the encoder's
    buffers (~33 MiB at 1080p); one thread is enough for a few images a second."""
    for image_format in ("jpeg", "png"):
        assert ImageEncoder(image_format).codec_for(64, 48).thread_count == 1
    frame = av.VideoFrame(64, 48, "yuv420p")
    for plane in frame.planes:
        plane.update(bytes(plane.buffer_size))
    assert ImageEncoder("jpeg").encode(frame).startswith(b"\xff\xd8")


def test_request_line_parsing() -> None:
    assert parse_request_line(b"GET /status?x=1 HTTP/1.1\r\nHost: a\r\n\r\n") == ("GET", "/status")
    assert parse_request_line(b"POST /metrics HTTP/1.0\r\n\r\n") == ("POST", "/metrics")
    for bad in (b"", b"GET /status\r\n\r\n", b"GET  /x HTTP/1.1\r\n", b"GET /\xff HTTP/1.1\r\n"):
        assert parse_request_line(bad) is None, bad
    assert parse_request_line(b"GET / SPDY/3\r\n\r\n") is None


class _NoAgent:
    """/healthz needs nothing from the agent; the other routes are covered by the agent tests."""


async def _exchange(port: int, request: bytes, *, close_write: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    if close_write:
        writer.write_eof()
    async with asyncio.timeout(10):
        answer = await reader.read()
    writer.close()
    return answer


@pytest.fixture
async def http_server(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(observability_server, "REQUEST_TIMEOUT_S", 0.5)
    server = ObservabilityServer(_NoAgent(), None, "127.0.0.1:0")  # type: ignore[arg-type]
    await server.start()
    yield server
    await server.stop()


async def test_the_endpoint_answers_each_request_once_and_closes(
    http_server: ObservabilityServer,
) -> None:
    answer = await _exchange(http_server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection: close" in head
    assert b"Content-Length: %d" % len(body) in head and json.loads(body) == {"status": "ok"}

    cases = {
        b"GET /nothing HTTP/1.1\r\n\r\n": b"HTTP/1.1 404 ",
        b"POST /healthz HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}": b"HTTP/1.1 405 ",
        b"not http at all\r\n\r\n": b"HTTP/1.1 400 ",
        b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n": b"HTTP/1.1 400 ",
        b"GET /healthz HTTP/1.1\r\n": b"HTTP/1.1 400 ",  # ends before the blank line
    }
    for request, expected in cases.items():
        assert (await _exchange(http_server.port, request)).startswith(expected), request[:40]


async def test_a_silent_client_is_cut_off(http_server: ObservabilityServer) -> None:
    answer = await _exchange(http_server.port, b"GET /healthz HTTP/1.1\r\n", close_write=False)
    assert answer.startswith(b"HTTP/1.1 400 ")
