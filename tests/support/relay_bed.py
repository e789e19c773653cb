"""The cloud side as the relay tests need it: devhub, a real agent with its cameras, a fake device
that only records the calls it gets, and relays started with whatever settings a test wants.

Relays run on the shared background loop (``servers``); tests talk to them over real sockets
(aiohttp with the devhub's CA, picows, ffprobe, ``tunnel-agent connect``). Everything the devhub
API is used for is in the few functions at the top, so that a change there is one change here.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import camera_entry
from tests.support.agent import AgentRunner
from tests.support.camera import RtspCamera
from tests.support.fake_device import FakeDevice
from tests.support.net import free_port, fresh_loopback_ip
from tests.support.processes import ManagedProcess
from tests.support.threadloop import ThreadLoop
from tunnel_agent.cloud.devhub.hub import DevHub
from tunnel_agent.cloud.relay.runner import RunningRelay, start_relay
from tunnel_agent.cloud.relay.settings import RelaySettings

API_KEY = "relay-bed-api-key-0123456789"
AGENT_DEVICE = "agent-cam"
FAKE_DEVICE = "fake-cam"
OFFLINE_DEVICE = "offline-cam"
AGENT_EVENTS = ("tunnel.opened", "tunnel.open_repeated", "tunnel.open_failed")


# -- the devhub, in one place -------------------------------------------------------------------


async def _start_devhub(folder: Path) -> DevHub:
    host = fresh_loopback_ip()
    devhub = DevHub(folder / "devhub", f"{host}:{free_port(host)}")
    await devhub.start()
    return devhub


async def _add_device(devhub: DevHub, device_id: str) -> str:
    """Register a device; its connection string."""
    devhub.add_device(device_id)
    return devhub.connection_string(device_id)


async def _fake_device(devhub: DevHub, device_id: str) -> FakeDevice:
    fake = FakeDevice(devhub.connection_string(device_id), devhub.ca.cert_file)
    await fake.start()
    return fake


async def _wait_device(devhub: DevHub, device_id: str, timeout_s: float) -> None:
    await devhub.wait_device(device_id, timeout_s)


# -- the bed --------------------------------------------------------------------------------------


class RawRecords(logging.Handler):
    """Log records as code produced them, before any scrubbing."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name} {record.getMessage()} {getattr(record, 'fields', '')}")

    def events(self, name: str) -> list[str]:
        return [line for line in self.lines if f" {name} " in line]

    def text(self) -> str:
        return "\n".join(self.lines)


@dataclass
class RelayBed:
    folder: Path
    servers: ThreadLoop
    devhub: DevHub
    agent: AgentRunner
    fake: FakeDevice
    cameras: dict[str, RtspCamera]
    records: RawRecords
    relays: list[RunningRelay] = field(default_factory=list)

    @property
    def ca_file(self) -> Path:
        return self.devhub.ca.cert_file

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def settings(
        self, host: str = "127.0.0.1", *, routes: list[dict[str, Any]] | None = None, **relay: Any
    ) -> RelaySettings:
        taken = {str(route.get("listen", "")) for route in routes or []}
        port = free_port(host)
        while f"{host}:{port}" in taken:  # a route's port, picked and let go before this one
            port = free_port(host)
        tls = self.devhub.ca.issue(f"relay-{host}-{port}", [host, "127.0.0.1"])
        return RelaySettings.model_validate(
            {
                "relay": {
                    "listen": f"{host}:{port}",
                    "public_url": f"wss://{host}:{port}",
                    "metrics_listen": f"127.0.0.1:{free_port()}",
                    "cert_file": tls.cert_file,
                    "key_file": tls.key_file,
                    "api_key": API_KEY,
                    "session_host": host,
                    "method_timeout": 5,
                    **relay,
                },
                "iothub": {
                    "service_connection_string": self.devhub.service_connection_string,
                    "ca_file": self.ca_file,
                },
                "routes": routes or [],
            }
        )

    def start_relay(
        self, host: str = "127.0.0.1", *, routes: list[dict[str, Any]] | None = None, **relay: Any
    ) -> RunningRelay:
        running = self.servers.run(start_relay(self.settings(host, routes=routes, **relay)))
        self.relays.append(running)
        return running

    def stop_relay(self, relay: RunningRelay) -> None:
        self.servers.run(relay.stop())
        self.relays.remove(relay)

    def camera_port(self, name: str = "plain") -> int:
        return self.cameras[name].port

    def device_calls(self) -> int:
        """tunnelOpen calls the real agent answered (opened, repeated or failed), from its log."""
        return sum(len(self.agent.events(name)) for name in AGENT_EVENTS)

    def close(self) -> None:
        for relay in list(self.relays):
            self.stop_relay(relay)
        self.agent.stop()
        self.servers.run(self.fake.stop())
        self.servers.run(self.devhub.stop())
        logging.getLogger().removeHandler(self.records)


def start_bed(
    folder: Path,
    servers: ThreadLoop,
    cameras: dict[str, RtspCamera],
    *,
    stub_ports: list[int] | None = None,
) -> RelayBed:
    """The module's cloud: ``cameras`` and, at ``stub_ports``, bare TCP listeners the agent may
    reach too (tests/support/tcp_camera.py)."""
    records = RawRecords()
    logging.getLogger().addHandler(records)
    logging.getLogger().setLevel(logging.INFO)
    devhub = servers.run(_start_devhub(folder))
    connection_string = servers.run(_add_device(devhub, AGENT_DEVICE))
    servers.run(_add_device(devhub, FAKE_DEVICE))
    servers.run(_add_device(devhub, OFFLINE_DEVICE))
    entries = [camera_entry(cam, f"cam-{name}") for name, cam in cameras.items()]
    if stub_ports:
        entries.append({"name": "stub", "host": "127.0.0.1", "ports": stub_ports})
    agent = AgentRunner(
        folder / "agent",
        {
            "hub": {"connection_string": connection_string, "ca_file": str(devhub.ca.cert_file)},
            "tunnel": {"ca_file": str(devhub.ca.cert_file)},
            "cameras": entries,
        },
    )
    fake = servers.run(_fake_device(devhub, FAKE_DEVICE))
    agent.wait_connected()
    servers.run(_wait_device(devhub, AGENT_DEVICE, 20))
    return RelayBed(folder, servers, devhub, agent, fake, cameras, records)


# -- talking to a relay ---------------------------------------------------------------------------


def api_url(relay: RunningRelay, path: str) -> str:
    host = relay.relay.settings.public_host
    return f"https://{host}:{relay.port}{path}"


async def call_api(
    bed: RelayBed,
    relay: RunningRelay,
    method: str,
    path: str,
    *,
    token: str | None = API_KEY,
    body: Any = None,
    source: str | None = None,
) -> tuple[int, Any]:
    """One request to the relay's API, from ``source`` (a loopback address) if given."""
    connector = aiohttp.TCPConnector(
        ssl=bed.tls(), local_addr=(source, 0) if source is not None else None
    )
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with (
        aiohttp.ClientSession(connector=connector) as http,
        http.request(method, api_url(relay, path), json=body, headers=headers) as response,
    ):
        text = await response.text()
        try:
            return response.status, await response.json(content_type=None) if text else None
        except ValueError:
            return response.status, text


async def create_session(
    bed: RelayBed, relay: RunningRelay, source: str | None = None, **body: Any
) -> dict[str, Any]:
    fields = {"deviceId": AGENT_DEVICE, "localPort": bed.camera_port(), **body}
    status, answer = await call_api(bed, relay, "POST", "/v1/sessions", body=fields, source=source)
    assert status == 201, answer
    return answer  # type: ignore[no-any-return]


class ConnectProcess:
    """``tunnel-agent connect`` as a user runs it: the token in the environment, never argv."""

    def __init__(
        self,
        folder: Path,
        connect_url: str,
        token: str,
        ca_file: Path,
        *,
        listen_port: int | None = None,
        env: dict[str, str] | None = None,
        prefix: list[str] | None = None,
    ) -> None:
        self.port = listen_port or free_port()
        folder.mkdir(parents=True, exist_ok=True)
        args = [
            *(prefix or []),
            sys.executable,
            "-m",
            "tunnel_agent",
            "connect",
            connect_url,
            "--listen",
            f"127.0.0.1:{self.port}",
            "--ca-file",
            str(ca_file),
        ]
        self.process = ManagedProcess(
            args,
            folder / f"connect-{self.port}.log",
            env={"TUNNEL_AGENT_TOKEN": token, "PYTHONUNBUFFERED": "1", **(env or {})},
        )

    def wait_listening(self, timeout_s: float = 20.0) -> None:
        self.process.wait_for(lambda out: "listening on" in out, timeout_s)

    def wait_exit(self, timeout_s: float = 20.0) -> int:
        return self.process.wait(timeout_s)

    def output(self) -> str:
        return self.process.output()

    def stop(self) -> int | None:
        return self.process.stop()


async def wait_closed(reader: asyncio.StreamReader, timeout_s: float) -> bytes:
    """Read until the far side closes (or resets); what arrived."""
    data = bytearray()
    async with asyncio.timeout(timeout_s):
        try:
            while chunk := await reader.read(65536):
                data += chunk
        except ConnectionResetError:
            pass
    return bytes(data)
