"""Every tunnelOpen error row, produced by real conditions, through the hub and a real agent."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio

from tests.support.agent import AgentRunner
from tests.support.dns import SilentDns
from tests.support.hub import HubHarness
from tests.support.net import free_port
from tests.support.tcp_camera import Connection, TcpCamera
from tests.support.threadloop import ThreadLoop
from tests.support.ws_endpoint import TunnelEndpoint, sink_handler
from tunnel_agent.cloud.devhub.certs import LocalCA

HANDSHAKE_TIMEOUT_S = 5.0
MAX_TUNNELS = 3


@pytest.fixture(scope="module")
def tcp_camera(servers: ThreadLoop) -> Iterator[TcpCamera]:
    cam = TcpCamera()
    servers.run(cam.start())
    yield cam
    servers.run(cam.stop())


@pytest.fixture(scope="module")
def closed_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def agent(
    tmp_path_factory: pytest.TempPathFactory,
    hub: HubHarness,
    ca: LocalCA,
    tcp_camera: TcpCamera,
    closed_port: int,
) -> Iterator[AgentRunner]:
    """The agent of every test here, on a machine whose DNS never answers."""
    folder = tmp_path_factory.mktemp("errors-agent")
    dns = SilentDns(folder / "dns")
    runner = AgentRunner(
        folder,
        {
            "hub": hub.hub_config(),
            "log": {"level": "DEBUG"},
            "tunnel": {
                "ca_file": str(ca.cert_file),
                "handshake_timeout": HANDSHAKE_TIMEOUT_S,
                "connect_timeout": 2.0,
                "max_tunnels": MAX_TUNNELS,
            },
            "cameras": [
                {"name": "stub", "host": "127.0.0.1", "ports": [tcp_camera.port]},
                {"name": "gone", "host": "127.0.0.1", "ports": [closed_port]},
            ],
        },
        env={"HTTPS_PROXY": "", "https_proxy": "", "ALL_PROXY": "", "all_proxy": ""},
        wrap=dns.wrap,
    )
    try:
        runner.wait_connected()
        hub.wait_device()
        yield runner
    finally:
        runner.stop()
        dns.close()
    hub.wait_device_gone()


class FreshCamera:
    """The stub camera as one test sees it: only the connections made during that test."""

    def __init__(self, camera: TcpCamera) -> None:
        self.port = camera.port
        self._camera = camera
        self._first = len(camera.connections)

    @property
    def connections(self) -> list[Connection]:
        return self._camera.connections[self._first :]


@pytest_asyncio.fixture
async def fresh(tcp_camera: TcpCamera, servers: ThreadLoop) -> AsyncIterator[FreshCamera]:
    """The stub camera, new to the test, checked for sockets left open after it."""
    assert await servers.call(tcp_camera.all_closed(5.0)), "an earlier test left a camera socket"
    camera = FreshCamera(tcp_camera)
    yield camera
    assert await servers.call(tcp_camera.all_closed(5.0)), "a camera socket was left open"


async def open_tunnel(
    hub: HubHarness, endpoint: str, token: str, port: int
) -> tuple[int, dict[str, Any], float]:
    started = time.monotonic()
    status, body = await hub.tunnel_open(endpoint, token, port)
    return status, body, time.monotonic() - started


def assert_error(body: dict[str, Any], code: str, target: str, message: str) -> None:
    assert body == {"code": code, "target": target, "message": message}


async def test_port_not_configured(
    agent: AgentRunner, hub: HubHarness, endpoint: TunnelEndpoint
) -> None:
    status, body, _ = await open_tunnel(hub, endpoint.url("/status/500"), "t", 9)
    assert status == 400
    assert body == {
        "code": "400",
        "target": "localhost:9",
        "message": "Local port is not available",
    }


async def test_camera_port_closed(
    agent: AgentRunner, hub: HubHarness, endpoint: TunnelEndpoint, closed_port: int
) -> None:
    status, body, _ = await open_tunnel(hub, endpoint.url("/status/500"), "t", closed_port)
    assert status == 400
    assert body == {
        "code": "400",
        "target": f"127.0.0.1:{closed_port}",
        "message": "Could not connect to RTSP endpoint",
    }


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        ("/tunnel/no-such-session", 404, "Not Found"),
        ("/status/401", 401, "Unauthorized"),
        ("/status/403", 403, "Forbidden"),
        ("/status/500", 500, "Internal Server Error"),
        ("/status/503", 503, "Service Unavailable"),
    ],
)
async def test_http_rejections_keep_their_status(
    agent: AgentRunner,
    hub: HubHarness,
    endpoint: TunnelEndpoint,
    fresh: FreshCamera,
    path: str,
    status: int,
    message: str,
) -> None:
    url = endpoint.url(path)
    answer, body, _ = await open_tunnel(hub, url + "?sig=query-secret", "token-abc", fresh.port)

    assert answer == status
    assert body == {"code": str(status), "target": url, "message": message}


async def test_wrong_token_is_a_401_from_the_endpoint(
    agent: AgentRunner,
    hub: HubHarness,
    endpoint: TunnelEndpoint,
    servers: ThreadLoop,
    fresh: FreshCamera,
) -> None:
    session = await servers.call(endpoint.new_session())
    url = endpoint.url(f"/tunnel/{session.id}")
    status, body, _ = await open_tunnel(hub, url, "not-" + session.token, fresh.port)

    assert status == 401
    assert_error(body, "401", url, "Unauthorized")


async def test_untrusted_certificate(
    agent: AgentRunner, hub: HubHarness, endpoint: TunnelEndpoint, fresh: FreshCamera
) -> None:
    url = endpoint.url("/status/200", listener="wss_untrusted")
    status, body, _ = await open_tunnel(hub, url, "t", fresh.port)

    assert status == 502
    assert_error(body, "502", url, "TLS certificate of the remote endpoint is not trusted")


async def test_plain_server_behind_wss_is_a_tls_failure(
    agent: AgentRunner, hub: HubHarness, endpoint: TunnelEndpoint, fresh: FreshCamera
) -> None:
    url = f"wss://127.0.0.1:{endpoint.ports['ws']}/status/200"
    status, body, _ = await open_tunnel(hub, url, "t", fresh.port)

    assert status == 502
    assert_error(body, "502", url, "TLS handshake with the remote endpoint failed")


async def test_unknown_host_is_answered_at_once_without_dns(
    agent: AgentRunner, hub: HubHarness, fresh: FreshCamera
) -> None:
    url = "wss://no-such-relay.invalid/t"
    status, body, took = await open_tunnel(hub, url, "t", fresh.port)

    assert status == 502
    assert_error(body, "502", url, "Could not resolve the remote endpoint host")
    assert took < HANDSHAKE_TIMEOUT_S  # the agent's DNS never answers: no lookup was made


async def test_connection_refused(agent: AgentRunner, hub: HubHarness, fresh: FreshCamera) -> None:
    url = f"wss://127.0.0.1:{free_port()}/t"
    status, body, _ = await open_tunnel(hub, url, "t", fresh.port)

    assert status == 502
    assert_error(body, "502", url, "Connection refused by the remote endpoint")


@pytest.fixture
def unreachable_ip() -> Iterator[str]:
    """An address the kernel has no route to: a route of type ``unreachable`` of this test's own.

    Connecting to it fails at once with "No route to host" and no packet leaves the machine. The
    link-local /32 is picked per process (clear of 169.254.169.x) and the route always removed.
    """
    address = f"169.254.{170 + os.getpid() % 50}.{next(_unreachable_hosts)}/32"
    subprocess.run(["ip", "route", "add", "unreachable", address], check=True, timeout=10)
    try:
        yield address.removesuffix("/32")
    finally:
        subprocess.run(["ip", "route", "del", "unreachable", address], check=False, timeout=10)


_unreachable_hosts = itertools.count(1)


async def test_unreachable_endpoint(
    agent: AgentRunner, hub: HubHarness, fresh: FreshCamera, unreachable_ip: str
) -> None:
    url = f"wss://{unreachable_ip}/t"
    status, body, _ = await open_tunnel(hub, url, "t", fresh.port)

    assert status == 502
    assert_error(body, "502", url, "Could not connect to the remote endpoint")


async def test_handshake_that_never_completes_times_out(
    agent: AgentRunner, hub: HubHarness, endpoint: TunnelEndpoint, fresh: FreshCamera
) -> None:
    url = endpoint.url("/t", listener="hang")
    status, body, took = await open_tunnel(hub, url, "t", fresh.port)

    assert status == 504
    assert_error(body, "504", url, "Timed out opening the WebSocket")
    assert HANDSHAKE_TIMEOUT_S <= took < HANDSHAKE_TIMEOUT_S + 3


async def test_an_endpoint_that_hangs_up_before_its_upgrade_answer_is_a_502(
    agent: AgentRunner, hub: HubHarness, endpoint: TunnelEndpoint, fresh: FreshCamera
) -> None:
    """TLS up, request read, connection closed: no tunnel is reported open, the camera is let go."""
    url = endpoint.url("/t", listener="wss_drop")
    status, body, took = await open_tunnel(hub, url, "t", fresh.port)

    assert status == 502
    assert_error(body, "502", url, "Remote endpoint closed the connection during the handshake")
    assert took < HANDSHAKE_TIMEOUT_S
    assert len(fresh.connections) == 1  # the camera was reached, and (fixture) closed again


async def test_ws_scheme_is_refused_unless_allowed(
    agent: AgentRunner, hub: HubHarness, endpoint: TunnelEndpoint, fresh: FreshCamera
) -> None:
    status, body, _ = await open_tunnel(hub, endpoint.url("/status/200", "ws"), "t", fresh.port)
    assert status == 400
    assert_error(
        body,
        "400",
        "remoteEndpoint",
        "remoteEndpoint must use wss:// (ws:// is not allowed by this device)",
    )
    assert fresh.connections == []  # refused before the camera was touched


async def test_too_many_tunnels_and_repeated_requests(
    agent: AgentRunner,
    hub: HubHarness,
    endpoint: TunnelEndpoint,
    servers: ThreadLoop,
    fresh: FreshCamera,
) -> None:
    sessions = [
        await servers.call(endpoint.new_session(handler=sink_handler))
        for _ in range(MAX_TUNNELS + 1)
    ]
    urls = [endpoint.url(f"/tunnel/{s.id}") for s in sessions]
    opened = [
        await open_tunnel(hub, urls[i], sessions[i].token, fresh.port) for i in range(MAX_TUNNELS)
    ]
    assert [o[0] for o in opened] == [200] * MAX_TUNNELS

    again, body, _ = await open_tunnel(hub, urls[0], sessions[0].token, fresh.port)
    assert again == 200 and body == opened[0][1]
    assert sessions[0].connections == 1

    over, body, _ = await open_tunnel(hub, urls[-1], sessions[-1].token, fresh.port)
    assert over == 503
    assert_error(body, "503", f"maxTunnels={MAX_TUNNELS}", "Too many open tunnels")
    assert sessions[-1].connections == 0

    close_camera_side(servers, fresh)
    agent.wait_event("tunnel.closed", count=MAX_TUNNELS)
    status, _, _ = await open_tunnel(hub, urls[-1], sessions[-1].token, fresh.port)
    assert status == 200

    close_camera_side(servers, fresh)
    for session in sessions:
        await servers.call(asyncio.wait_for(session.finished.wait(), 10))


def close_camera_side(servers: ThreadLoop, camera: FreshCamera) -> None:
    for connection in camera.connections:
        servers.loop.call_soon_threadsafe(connection.writer.close)


async def test_every_request_leaves_one_log_line_without_secrets(
    agent: AgentRunner, hub: HubHarness, endpoint: TunnelEndpoint, fresh: FreshCamera
) -> None:
    before = len(agent.events("tunnel.open_failed"))
    requests = [
        (endpoint.url("/status/403") + "?sig=Query-Secret-1", "Token-Secret-2", fresh.port),
        (endpoint.url("/status/200", "ws"), "Token-Secret-3", fresh.port),
        (endpoint.url("/status/500"), "Token-Secret-4", 9),
    ]
    answers = [await open_tunnel(hub, *request) for request in requests]

    assert [a[0] for a in answers] == [403, 400, 400]
    failures = agent.events("tunnel.open_failed")[before:]
    assert [int(e["status"]) for e in failures] == [403, 400, 400]
    assert all(len(e["tunnel"]) == 12 for e in failures)
    assert len({e["tunnel"] for e in failures}) == 3
    text = agent.output()
    for secret in ("Query-Secret-1", "Token-Secret-2", "Token-Secret-3", "Token-Secret-4"):
        assert secret not in text


async def test_any_other_method_is_404_unknown_method(agent: AgentRunner, hub: HubHarness) -> None:
    status, body = await hub.invoke("reboot", {"now": True})

    assert status == 404
    assert_error(body, "404", "reboot", "Unknown method")
    assert agent.wait_event("hub.unknown_method")[-1]["method"] == "reboot"


async def test_a_redirect_is_not_followed(
    agent: AgentRunner,
    hub: HubHarness,
    endpoint: TunnelEndpoint,
    servers: ThreadLoop,
    fresh: FreshCamera,
) -> None:
    session = await servers.call(endpoint.new_session(handler=sink_handler))
    url = endpoint.url(f"/redirect/{session.id}")
    status, body, _ = await open_tunnel(hub, url, session.token, fresh.port)

    assert status == 302
    assert_error(body, "302", url, "Found")
    assert (f"/redirect/{session.id}", 302) in endpoint.rejections  # the Location was sent
    assert session.upgrade_requests == 0  # and the token never went there


async def test_a_repeated_request_while_the_tunnel_is_opening_gets_the_same_tunnel(
    agent: AgentRunner,
    hub: HubHarness,
    endpoint: TunnelEndpoint,
    servers: ThreadLoop,
    fresh: FreshCamera,
) -> None:
    session = await servers.call(endpoint.new_session(handler=sink_handler, hold_upgrade=True))
    url = endpoint.url(f"/tunnel/{session.id}")
    received = len(agent.events("hub.method_received"))
    first = asyncio.create_task(hub.tunnel_open(url, session.token, fresh.port))
    await servers.call(asyncio.wait_for(session.upgrade_requested.wait(), 20))
    second = asyncio.create_task(hub.tunnel_open(url, session.token, fresh.port))
    await asyncio.to_thread(agent.wait_event, "hub.method_received", received + 2)
    assert not first.done() and not second.done()  # both wait on the one opening

    assert session.release_upgrade is not None
    servers.loop.call_soon_threadsafe(session.release_upgrade.set)
    (status1, body1), (status2, body2) = await asyncio.gather(first, second)

    assert (status1, status2) == (200, 200)
    assert body1 == body2 and set(body1) == {"tunnelId"}
    assert session.upgrade_requests == 1 and session.connections == 1
    assert len(fresh.connections) == 1
    close_camera_side(servers, fresh)
    await servers.call(asyncio.wait_for(session.finished.wait(), 10))
