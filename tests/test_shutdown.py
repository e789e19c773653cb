"""Shutdown is complete and bounded: tunnels still opening are cancelled with both sockets closed,
and the whole stop, hub unreachable included, ends within ``shutdown_timeout``."""

from __future__ import annotations

import asyncio
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest_asyncio

from tests.support.agent import AgentRunner
from tests.support.hub import HubHarness
from tests.support.inprocess import service_for
from tests.support.tcp_camera import TcpCamera
from tests.support.threadloop import ThreadLoop
from tests.support.waiting import until
from tunnel_agent.agent import EXIT_FORCED
from tunnel_agent.cloud.devhub.certs import LocalCA
from tunnel_agent.tunnel.errors import MSG_SHUTTING_DOWN

HANDSHAKE_TIMEOUT_S = 60.0  # far beyond the shutdown bound: only cancelling ends the opening


class SilentEndpoint:
    """A TLS listener that reads the WebSocket upgrade request and never answers it."""

    def __init__(self, tls: ssl.SSLContext) -> None:
        self.tls = tls
        self.requests: list[bytes] = []
        self.ended: list[asyncio.Event] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]

    def url(self) -> str:
        return f"wss://127.0.0.1:{self.port}/tunnel/silent"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ended = asyncio.Event()
        self.ended.append(ended)
        request = b""
        try:
            while data := await reader.read(65536):
                request += data
                if b"\r\n\r\n" in request:
                    self.requests.append(request)
        except (OSError, ssl.SSLError):
            pass
        finally:
            ended.set()
            writer.close()

    def all_ended(self) -> bool:
        return bool(self.ended) and all(e.is_set() for e in self.ended)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()


def broker_processes(hub: HubHarness) -> list[psutil.Process]:
    config = str(hub.broker.config_file)
    return [
        p for p in psutil.process_iter(["cmdline"]) if config in " ".join(p.info["cmdline"] or [])
    ]


@pytest_asyncio.fixture
async def silent(endpoint_tls: ssl.SSLContext) -> AsyncIterator[SilentEndpoint]:
    server = SilentEndpoint(endpoint_tls)
    await server.start()
    yield server
    await server.stop()


async def test_a_tunnel_still_opening_is_cancelled_with_both_sockets_closed(
    ca: LocalCA, stub: TcpCamera, silent: SilentEndpoint
) -> None:
    service = service_for(ca, stub.port, handshake_timeout=HANDSHAKE_TIMEOUT_S)
    payload = {
        "remoteEndpoint": silent.url(),
        "remoteAuthorizationToken": "opening-token",
        "localPort": stub.port,
    }
    answer = asyncio.create_task(service.tunnel_open(payload))
    await until(lambda: silent.requests and stub.connections, 10)
    assert service.registry.opening == 1 and not answer.done()
    assert b"Authorization: Bearer opening-token" in silent.requests[0]

    started = time.monotonic()
    await service.registry.close_all("agent shutdown", 5.0)
    result = await asyncio.wait_for(answer, 1)

    assert (result.status, result.body["message"]) == (503, MSG_SHUTTING_DOWN)
    assert service.registry.opening == 0 and service.registry.open_tunnels == []
    assert await stub.all_closed(2)  # the camera socket
    await until(silent.all_ended, 2)  # the WebSocket's, while this process lives on
    assert time.monotonic() - started < 3
    # A repeated request after shutdown is refused at once, without connecting anything.
    again = await service.tunnel_open(payload)
    assert again.status == 503 and len(stub.connections) == 1


async def test_shutdown_stays_within_shutdown_timeout_with_a_tunnel_opening_and_no_hub(
    tmp_path: Path, ca: LocalCA, servers: ThreadLoop, stub: TcpCamera, silent: SilentEndpoint
) -> None:
    shutdown_timeout_s = 6.0
    own_hub = HubHarness(tmp_path, ca, servers, device_id="stopping")
    agent = AgentRunner(
        tmp_path / "agent",
        {
            "shutdown_timeout": shutdown_timeout_s,
            "hub": {**own_hub.hub_config(), "operation_timeout": 30, "retry_interval": 1},
            "tunnel": {
                "ca_file": str(ca.cert_file),
                "handshake_timeout": HANDSHAKE_TIMEOUT_S,
                "allowed_remote_hosts": ["127.0.0.1"],
            },
            "cameras": [{"name": "stub", "host": "127.0.0.1", "ports": [stub.port]}],
        },
    )
    try:
        agent.wait_connected()
        own_hub.wait_device()
        opening = asyncio.ensure_future(
            own_hub.invoke(
                "tunnelOpen",
                {
                    "remoteEndpoint": silent.url(),
                    "remoteAuthorizationToken": "t0ken-opening",
                    "localPort": stub.port,
                },
                timeout_s=HANDSHAKE_TIMEOUT_S,
            )
        )
        await until(lambda: silent.requests and stub.connections, 15)
        # The hub becomes unreachable the hard way: connected, but nothing is ever answered
        # (the method answer and the disconnect wait for acknowledgements that never come).
        (broker,) = broker_processes(own_hub)
        broker.suspend()

        started = time.monotonic()
        agent.process.signal(signal.SIGTERM)
        code = await asyncio.to_thread(agent.process.wait, shutdown_timeout_s + 10)
        took_s = time.monotonic() - started
    finally:
        for broker in broker_processes(own_hub):
            broker.resume()
        agent.stop()
        own_hub.stop()
    opening.cancel()

    assert code == 0, agent.output()[-3000:]  # a graceful stop, not the forced exit
    assert took_s <= shutdown_timeout_s + 1.0, took_s
    (stopping,) = agent.events("agent.stopping")
    assert stopping["opening_tunnels"] == "1"
    (refused,) = agent.events("tunnel.open_failed")
    assert refused["status"] == "503" and refused["message"] == MSG_SHUTTING_DOWN
    assert await stub.all_closed(2)
    await until(silent.all_ended, 2)
    assert agent.events("agent.stopped")


def test_the_last_guarantee_ends_a_process_that_hangs_after_the_stop_signal() -> None:
    """Whatever the graceful sequence cannot end (here a non-daemon thread that never returns,
    as a stuck library call would be), the process exits at the bound, saying so."""
    program = (
        "import threading, time\n"
        "from tunnel_agent.logs import configure_logging\n"
        "from tunnel_agent.agent import exit_after\n"
        "configure_logging('INFO', 'text')\n"
        "threading.Thread(target=time.sleep, args=(60,)).start()\n"
        "exit_after(1.0)\n"
    )
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=30
    )
    took_s = time.monotonic() - started
    assert result.returncode == EXIT_FORCED
    assert "agent.shutdown_forced" in result.stderr and "ERROR" in result.stderr
    assert 1.0 <= took_s < 10, took_s
