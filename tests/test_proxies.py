"""Tunnels and the hub link through real proxies: tinyproxy (HTTP CONNECT), microsocks (SOCKS5)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import AgentFactory, camera_entry
from tests.support.camera import RtspCamera
from tests.support.hub import HubHarness
from tests.support.proxies import DanteSocks4, Microsocks, Tinyproxy
from tests.support.threadloop import ThreadLoop
from tests.support.ws_endpoint import TunnelEndpoint
from tests.test_tunnel_video import ffprobe

PROXY_USER = "gateway"
PROXY_PASSWORD = "Pr0xy-Pa55"
NO_ENV_PROXY = {
    name: ""
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy")
}


@pytest.fixture(scope="module")
def tinyproxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tinyproxy]:
    proxy = Tinyproxy(tmp_path_factory.mktemp("tinyproxy"), PROXY_USER, PROXY_PASSWORD)
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def microsocks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Microsocks]:
    proxy = Microsocks(tmp_path_factory.mktemp("microsocks"), PROXY_USER, PROXY_PASSWORD)
    yield proxy
    proxy.stop()


async def stream_through(
    hub: HubHarness, camera: RtspCamera, endpoint: TunnelEndpoint, servers: ThreadLoop
) -> int:
    session = await servers.call(endpoint.new_session())
    status, body = await hub.tunnel_open(
        endpoint.url(f"/tunnel/{session.id}"), session.token, camera.port
    )
    assert status == 200, body
    info = await ffprobe(f"rtsp://127.0.0.1:{session.consumer_port}/test")
    assert info["streams"][0]["codec_name"] == "h264"  # type: ignore[index]
    return session.counters.to_consumer


async def test_hub_and_tunnel_through_tinyproxy(
    agent_factory: AgentFactory,
    hub: HubHarness,
    camera: RtspCamera,
    endpoint: TunnelEndpoint,
    servers: ThreadLoop,
    tinyproxy: Tinyproxy,
) -> None:
    before = tinyproxy.process.output().count(f"CONNECT 127.0.0.1:{endpoint.ports['wss']}")
    agent = agent_factory(
        [camera_entry(camera)], extra={"proxy": {"url": tinyproxy.url()}}, env=NO_ENV_PROXY
    )
    log = tinyproxy.process.output()
    assert f"CONNECT {hub.host}:8883" in log  # the hub link went through the proxy

    assert await stream_through(hub, camera, endpoint, servers) > 2_000

    after = tinyproxy.process.output().count(f"CONNECT 127.0.0.1:{endpoint.ports['wss']}")
    assert after == before + 1
    assert PROXY_PASSWORD not in agent.output()


async def test_hub_and_tunnel_through_microsocks(
    agent_factory: AgentFactory,
    hub: HubHarness,
    camera: RtspCamera,
    endpoint: TunnelEndpoint,
    servers: ThreadLoop,
    microsocks: Microsocks,
) -> None:
    agent = agent_factory(
        [camera_entry(camera)], extra={"proxy": {"url": microsocks.url()}}, env=NO_ENV_PROXY
    )
    assert await stream_through(hub, camera, endpoint, servers) > 2_000
    log = microsocks.process.output()
    assert f"connected to {hub.host}:8883" in log
    assert f"connected to 127.0.0.1:{endpoint.ports['wss']}" in log
    assert PROXY_PASSWORD not in agent.output()


async def test_hub_and_tunnel_through_a_socks4_proxy(
    agent_factory: AgentFactory,
    hub: HubHarness,
    camera: RtspCamera,
    endpoint: TunnelEndpoint,
    servers: ThreadLoop,
    tmp_path: Path,
) -> None:
    proxy = DanteSocks4(tmp_path)
    try:
        agent_factory(
            [camera_entry(camera)], extra={"proxy": {"url": proxy.url()}}, env=NO_ENV_PROXY
        )
        assert await stream_through(hub, camera, endpoint, servers) > 2_000
        assert proxy.connected_to(hub.host, 8883)  # the hub link went through it
        assert proxy.connected_to("127.0.0.1", endpoint.ports["wss"])
    finally:
        proxy.stop()


async def test_tunnel_through_plain_socks5(
    agent_factory: AgentFactory,
    hub: HubHarness,
    camera: RtspCamera,
    endpoint: TunnelEndpoint,
    servers: ThreadLoop,
    microsocks: Microsocks,
) -> None:
    before = microsocks.process.output().count(f"connected to 127.0.0.1:{endpoint.ports['wss']}")
    agent_factory(
        [camera_entry(camera)], env={**NO_ENV_PROXY, "HTTPS_PROXY": microsocks.url("socks5")}
    )
    assert await stream_through(hub, camera, endpoint, servers) > 2_000
    log = microsocks.process.output()
    assert log.count(f"connected to 127.0.0.1:{endpoint.ports['wss']}") == before + 1


async def test_a_proxy_that_refuses_the_endpoint_is_a_502_with_its_status(
    agent_factory: AgentFactory,
    hub: HubHarness,
    camera: RtspCamera,
    endpoint: TunnelEndpoint,
    servers: ThreadLoop,
    tmp_path: Path,
) -> None:
    # CONNECT only to port 443: tinyproxy answers any other with 403.
    proxy = Tinyproxy(tmp_path, PROXY_USER, PROXY_PASSWORD, extra=("ConnectPort 443",))
    try:
        agent_factory([camera_entry(camera)], env={**NO_ENV_PROXY, "HTTPS_PROXY": proxy.url()})
        session = await servers.call(endpoint.new_session())
        url = endpoint.url(f"/tunnel/{session.id}")
        status, body = await hub.tunnel_open(url, session.token, camera.port)
    finally:
        proxy.stop()
    assert (status, body) == (
        502,
        {"code": "502", "target": url, "message": "Proxy refused the connection (HTTP 403)"},
    )
    assert session.upgrade_requests == 0


async def test_a_proxy_that_never_answers_is_a_504(
    agent_factory: AgentFactory,
    hub: HubHarness,
    camera: RtspCamera,
    endpoint: TunnelEndpoint,
    servers: ThreadLoop,
) -> None:
    handshake_timeout_s = 3.0
    silent = f"http://127.0.0.1:{endpoint.ports['hang']}"  # accepts, then never says a word
    agent_factory(
        [camera_entry(camera)],
        tunnel={"handshake_timeout": handshake_timeout_s},
        env={**NO_ENV_PROXY, "HTTPS_PROXY": silent},
    )
    session = await servers.call(endpoint.new_session())
    url = endpoint.url(f"/tunnel/{session.id}")
    started = time.monotonic()
    status, body = await hub.tunnel_open(url, session.token, camera.port)
    took = time.monotonic() - started

    assert (status, body) == (
        504,
        {"code": "504", "target": url, "message": "Timed out connecting through the proxy"},
    )
    assert handshake_timeout_s <= took < handshake_timeout_s + 5
    assert session.upgrade_requests == 0


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("http", "Proxy authentication failed (HTTP 401)"),  # what tinyproxy answers
        ("socks5h", "Proxy authentication failed (SOCKS)"),
    ],
)
async def test_wrong_proxy_credentials_give_a_clear_answer(
    agent_factory: AgentFactory,
    hub: HubHarness,
    camera: RtspCamera,
    endpoint: TunnelEndpoint,
    servers: ThreadLoop,
    tinyproxy: Tinyproxy,
    microsocks: Microsocks,
    kind: str,
    message: str,
) -> None:
    wrong = "wrong-Pa55"
    proxy = (
        tinyproxy.url(password=wrong) if kind == "http" else microsocks.url(kind, password=wrong)
    )
    # Through the environment the proxy applies to tunnels only, so the hub link stays up.
    agent = agent_factory([camera_entry(camera)], env={**NO_ENV_PROXY, "HTTPS_PROXY": proxy})
    session = await servers.call(endpoint.new_session())
    url = endpoint.url(f"/tunnel/{session.id}")

    status, body = await hub.tunnel_open(url, session.token, camera.port)

    assert (status, body) == (502, {"code": "502", "target": url, "message": message})
    assert session.connections == 0
    assert wrong not in agent.output()


async def test_no_proxy_exempts_the_endpoint(
    agent_factory: AgentFactory,
    hub: HubHarness,
    camera: RtspCamera,
    endpoint: TunnelEndpoint,
    servers: ThreadLoop,
    tinyproxy: Tinyproxy,
) -> None:
    env = {
        **NO_ENV_PROXY,
        "HTTPS_PROXY": tinyproxy.url(password="wrong"),
        "NO_PROXY": "localhost,127.0.0.0/8",
    }
    agent_factory([camera_entry(camera)], env=env)
    assert await stream_through(hub, camera, endpoint, servers) > 2_000


async def test_proxy_down_is_a_502(
    agent_factory: AgentFactory,
    hub: HubHarness,
    camera: RtspCamera,
    endpoint: TunnelEndpoint,
    servers: ThreadLoop,
    tmp_path: Path,
) -> None:
    from tests.support.net import free_port

    agent_factory(
        [camera_entry(camera)],
        env={**NO_ENV_PROXY, "HTTPS_PROXY": f"http://127.0.0.1:{free_port()}"},
    )
    session = await servers.call(endpoint.new_session())
    status, body = await asyncio.wait_for(
        hub.tunnel_open(endpoint.url(f"/tunnel/{session.id}"), session.token, camera.port), 30
    )
    assert (status, body["message"]) == (502, "Could not connect to the proxy")
