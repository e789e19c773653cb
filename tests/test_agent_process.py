"""The agent as a process: shutdown on SIGTERM, hub outages, secrets in logs, and the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import av
import pytest
from aiohttp import web

from tests.conftest import AgentFactory, camera_entry
from tests.support import toml_writer
from tests.support.agent import AgentRunner
from tests.support.camera import RtspCamera
from tests.support.hub import HubHarness
from tests.support.proxies import Tinyproxy
from tests.support.tcp_camera import TcpCamera
from tests.support.threadloop import ThreadLoop
from tests.support.waiting import until
from tests.support.ws_endpoint import Session, TunnelEndpoint, sink_handler
from tunnel_agent import __version__
from tunnel_agent.cloud.devhub.certs import LocalCA


@pytest.fixture
def tcp_camera(servers: ThreadLoop) -> Iterator[TcpCamera]:
    cam = TcpCamera()
    servers.run(cam.start())
    yield cam
    servers.run(cam.stop())


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_stop_signal_closes_open_tunnels_and_exits_0(
    agent_factory: AgentFactory,
    hub: HubHarness,
    endpoint: TunnelEndpoint,
    servers: ThreadLoop,
    tcp_camera: TcpCamera,
    stop_signal: signal.Signals,
) -> None:
    agent = agent_factory([{"name": "stub", "host": "127.0.0.1", "ports": [tcp_camera.port]}])
    sessions = [await servers.call(endpoint.new_session(handler=sink_handler)) for _ in range(3)]
    for session in sessions:
        status, _ = await hub.tunnel_open(
            endpoint.url(f"/tunnel/{session.id}"), session.token, tcp_camera.port
        )
        assert status == 200
    started = time.monotonic()

    agent.process.signal(stop_signal)
    code = await asyncio.to_thread(agent.process.wait, 15)

    assert code == 0
    assert time.monotonic() - started < 10
    assert await servers.call(tcp_camera.all_closed(2)), "camera sockets left open"
    for session in sessions:
        assert session.finished.is_set()
        assert session.close_code == 1001
    closed = agent.events("tunnel.closed")
    assert len(closed) == 3 and {e["reason"] for e in closed} == {"agent shutdown"}
    assert agent.events("agent.stopped")


async def test_a_request_while_the_agent_stops_is_503_agent_is_shutting_down(
    agent_factory: AgentFactory,
    hub: HubHarness,
    endpoint: TunnelEndpoint,
    servers: ThreadLoop,
    tcp_camera: TcpCamera,
) -> None:
    async def never_answer_the_close(ws: web.WebSocketResponse, session: Session) -> None:
        assert session.request is not None and session.request.transport is not None
        session.request.transport.pause_reading()
        with contextlib.suppress(TimeoutError):  # until the agent aborts it
            await asyncio.wait_for(ws.receive(), 30)

    # The open tunnel's CLOSE is never answered: the agent keeps stopping for close_timeout.
    agent = agent_factory(
        [{"name": "stub", "host": "127.0.0.1", "ports": [tcp_camera.port]}],
        tunnel={"close_timeout": 8.0},
    )
    held = await servers.call(endpoint.new_session(handler=never_answer_the_close))
    status, _ = await hub.tunnel_open(
        endpoint.url(f"/tunnel/{held.id}"), held.token, tcp_camera.port
    )
    assert status == 200

    agent.process.signal(signal.SIGTERM)
    await asyncio.to_thread(agent.wait_event, "agent.stopping")
    late = await servers.call(endpoint.new_session(handler=sink_handler))
    status, body = await hub.tunnel_open(
        endpoint.url(f"/tunnel/{late.id}"), late.token, tcp_camera.port
    )

    assert (status, body) == (
        503,
        {"code": "503", "target": "agent", "message": "Agent is shutting down"},
    )
    assert late.upgrade_requests == 0
    assert await asyncio.to_thread(agent.process.wait, 30) == 0
    assert [e["reason"] for e in agent.events("tunnel.closed")] == ["agent shutdown"]


def decode_continuously(url: str, stop: threading.Event, frames: list[float]) -> None:
    with av.open(
        url, options={"rtsp_transport": "tcp", "timeout": "10000000"}, timeout=(10, 10)
    ) as container:
        for _ in container.decode(video=0):
            frames.append(time.monotonic())
            if stop.is_set():
                return


async def test_tunnel_survives_a_hub_restart_and_new_tunnels_open_after(
    tmp_path: Path, ca: LocalCA, servers: ThreadLoop, camera: RtspCamera, endpoint: TunnelEndpoint
) -> None:
    own_hub = HubHarness(tmp_path, ca, servers, device_id="restart-cam")
    agent = AgentRunner(
        tmp_path / "agent",
        {
            "hub": {**own_hub.hub_config(), "retry_interval": 1},
            "tunnel": {"ca_file": str(ca.cert_file)},
            "cameras": [camera_entry(camera)],
        },
    )
    try:
        agent.wait_connected()
        own_hub.wait_device()
        session = await servers.call(endpoint.new_session())
        status, _ = await own_hub.tunnel_open(
            endpoint.url(f"/tunnel/{session.id}"), session.token, camera.port
        )
        assert status == 200
        stop, frames = threading.Event(), []
        reader = threading.Thread(
            target=decode_continuously,
            args=(f"rtsp://127.0.0.1:{session.consumer_port}/test", stop, frames),
        )
        reader.start()
        await until(lambda: len(frames) >= 10, 20)

        await servers.call(own_hub.broker.restart())
        restarted = time.monotonic()
        agent.wait_event("hub.connected", count=2, timeout_s=30)
        own_hub.wait_device()
        reconnected = time.monotonic()
        await until(lambda: any(t > reconnected for t in frames), 20)  # video goes on after it
        assert not agent.events("tunnel.closed")  # checked before the viewer stops

        stop.set()
        await asyncio.to_thread(reader.join, 15)
        assert any(t > restarted for t in frames), "video stopped with the hub"
        assert agent.events("hub.disconnected")
        second = await servers.call(endpoint.new_session(handler=sink_handler))
        status, body = await own_hub.tunnel_open(
            endpoint.url(f"/tunnel/{second.id}"), second.token, camera.port
        )
        assert status == 200, body
    finally:
        agent.stop()
        own_hub.stop()


async def test_token_and_passwords_never_reach_the_logs(
    agent_factory: AgentFactory,
    hub: HubHarness,
    auth_camera: RtspCamera,
    endpoint: TunnelEndpoint,
    servers: ThreadLoop,
    tmp_path: Path,
) -> None:
    proxy = Tinyproxy(tmp_path, "gw", "Pr0xy-Secret-77")
    try:
        agent = agent_factory(
            [camera_entry(auth_camera)],
            extra={"proxy": {"url": proxy.url()}, "log": {"level": "DEBUG"}},
        )
        session = await servers.call(endpoint.new_session())
        url = endpoint.url(f"/tunnel/{session.id}") + "?sig=Query-Secret-99"
        ok, _ = await hub.tunnel_open(url, session.token, auth_camera.port)
        bad, _ = await hub.tunnel_open(url, "Wrong-Token-Secret-55", auth_camera.port)
        refused, _ = await hub.tunnel_open(endpoint.url("/status/500"), "Other-Token-66", 1)
        assert (ok, bad, refused) == (200, 401, 400)
        agent.stop()
    finally:
        proxy.stop()
    text = agent.output()
    assert "tunnel.opened" in text and "tunnel.open_failed" in text
    for secret in (
        session.token,
        "Wrong-Token-Secret-55",
        "Other-Token-66",
        "Query-Secret-99",
        auth_camera.password,
        "Pr0xy-Secret-77",
        hub.shared_access_key,
    ):
        assert secret and secret not in text, secret


def run_cli(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tunnel_agent", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"tunnel-agent {__version__}"


def test_check_prints_redacted_config_and_probes_ports(
    tmp_path: Path, hub: HubHarness, camera: RtspCamera
) -> None:
    from tests.support.net import free_port

    closed = free_port()
    config = tmp_path / "agent.toml"
    config.write_text(
        toml_writer.dumps(
            {
                "hub": hub.hub_config(),
                "proxy": {"url": "http://gw:Pr0xy-Secret@127.0.0.1:3128"},
                "cameras": [
                    {"name": "lobby", "ports": [camera.port], "password": "Cam-Secret-1"},
                    {"name": "door", "ports": [closed]},
                ],
            }
        )
    )

    result = run_cli("check", "--config", str(config))

    assert result.returncode == 1
    for secret in ("Pr0xy-Secret", "Cam-Secret-1", hub.shared_access_key):
        assert secret not in result.stdout
    effective = json.loads(result.stdout[: result.stdout.index("\n}\n") + 2])
    assert effective["proxy"]["url"] == "http://gw:***@127.0.0.1:3128"
    assert effective["cameras"][0]["password"] == "***"
    assert f"ok    camera 'lobby' 127.0.0.1:{camera.port}" in result.stdout
    assert f"FAIL  camera 'door' 127.0.0.1:{closed}" in result.stdout

    config.write_text(
        toml_writer.dumps(
            {"hub": hub.hub_config(), "cameras": [{"name": "lobby", "ports": [camera.port]}]}
        )
    )
    assert run_cli("check", "--config", str(config)).returncode == 0


def test_invalid_configuration_stops_start_up_naming_the_field(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('[tunnel]\nmax_tunnels = "many"\n')

    for command in ("run", "check"):
        result = run_cli(command, "--config", str(config))
        assert result.returncode == 2
        assert "tunnel.max_tunnels" in result.stdout + result.stderr
