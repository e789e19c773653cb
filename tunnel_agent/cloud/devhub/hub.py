"""``tunnel-agent devhub``: the local IoT Hub emulator, assembled.

One host name for everything: the REST API on ``--rest`` and the devices' MQTT endpoint (TLS) on
the same host, port ``--mqtt-port`` (8883, the port the SDKs use), optionally MQTT over
WebSockets and DPS. Behind the front door runs one mosquitto for every device. The CA in the
state folder signs the endpoints; the addresses are written to the state folder so that
``add-device`` and ``connection-string``, run as separate commands, print the right host name.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import resource
import shutil
import ssl
import tempfile
import time
from collections.abc import Coroutine
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from tunnel_agent.cloud.devhub.access import (
    CONNACK_REFUSED_NOT_AUTHORIZED,
    PeerCertificate,
    Principal,
    Refused,
    authenticate_device,
    authenticate_registration,
    is_registration_username,
)
from tunnel_agent.cloud.devhub.broker import BrokerSpec, MosquittoBroker
from tunnel_agent.cloud.devhub.certs import LocalCA
from tunnel_agent.cloud.devhub.dps import DpsService
from tunnel_agent.cloud.devhub.front_door import DoorConfig, FrontDoor
from tunnel_agent.cloud.devhub.mqtt_codec import Connect
from tunnel_agent.cloud.devhub.registry import SERVICE_POLICY, DeviceRegistry
from tunnel_agent.cloud.devhub.rest import HubRestApi
from tunnel_agent.cloud.devhub.service import HubService
from tunnel_agent.cloud.devhub.twins import TwinStore
from tunnel_agent.cloud.devhub.websocket import websocket_app
from tunnel_agent.config.base import split_host_port
from tunnel_agent.logs import SECRETS, EventLogger

MQTT_PORT = 8883
WEBSOCKET_PATH = "/$iothub/websocket"
ADDRESSES_FILE = "addresses.json"
SERVICE_READY_S = 15.0


@dataclass(frozen=True)
class HubAddresses:
    """Where a devhub listens; kept in the state folder for the other commands."""

    hostname: str
    rest: str
    mqtt: str
    websockets: str | None = None
    dps: str | None = None

    def save(self, state: Path) -> None:
        state.mkdir(parents=True, exist_ok=True)
        temporary = state / f"{ADDRESSES_FILE}.tmp"
        temporary.write_text(json.dumps(asdict(self), indent=1))
        temporary.replace(state / ADDRESSES_FILE)

    @classmethod
    def load(cls, state: Path) -> HubAddresses | None:
        try:
            document = json.loads((state / ADDRESSES_FILE).read_text())
            return cls(**document)
        except (OSError, ValueError, TypeError):
            return None


def device_connection_string(hostname: str, device: dict[str, Any]) -> str:
    auth = device.get("authentication") or {}
    base = f"HostName={hostname};DeviceId={device['deviceId']}"
    key = (auth.get("symmetricKey") or {}).get("primaryKey")
    if auth.get("type") == "sas" and key:
        return f"{base};SharedAccessKey={key}"
    return f"{base};x509=true"


class DevHub:
    def __init__(
        self,
        state: Path,
        rest_listen: str = "127.0.0.1:8444",
        mqtt_port: int = MQTT_PORT,
        *,
        websocket_port: int | None = None,
        dps_listen: str | None = None,
        ca: LocalCA | None = None,
    ) -> None:
        """``ca``: sign with this CA instead of the state folder's own (tests share one)."""
        self.state = state
        self.rest_host, self.rest_port = split_host_port(rest_listen)
        self.mqtt_port = mqtt_port
        self.websocket_port = websocket_port
        self.dps_address = _dps_address(dps_listen) if dps_listen else None
        self.registry = DeviceRegistry(state)
        self.ca = ca or LocalCA(state / "ca")
        self.twins = TwinStore(state / "twins")
        self.log = EventLogger("tunnel_agent.devhub")
        self._private = Path(tempfile.mkdtemp(prefix="devhub-"))  # 0700: the broker's socket
        socket_path = self._private / "mqtt.sock"
        self.broker = MosquittoBroker(BrokerSpec(state / "broker", socket_path))
        self.service = HubService(str(socket_path), self.twins)
        self.dps = DpsService(
            self.registry,
            self.twins,
            self.service.client,
            self.hostname,
            self.service.registration_enrollments,
        )
        self.service.on_registration = self.dps.handle
        self.door = FrontDoor(DoorConfig(str(socket_path), self.service, self.log))
        self._tasks: set[asyncio.Task[None]] = set()
        self._runners: list[web.AppRunner] = []

    @property
    def hostname(self) -> str:
        return self.rest_host

    @property
    def hub_name(self) -> str:
        """What the service connection string calls the hub: the REST address."""
        return f"{self.rest_host}:{self.rest_port}"

    @property
    def rest_url(self) -> str:
        return f"https://{self.hub_name}"

    @property
    def addresses(self) -> HubAddresses:
        return HubAddresses(
            self.hostname,
            self.hub_name,
            f"{self.hostname}:{self.mqtt_port}",
            f"{self.hostname}:{self.websocket_port}" if self.websocket_port else None,
            f"{self.dps_address[0]}:{self.dps_address[1]}" if self.dps_address else None,
        )

    @property
    def service_connection_string(self) -> str:
        return (
            f"HostName={self.hub_name};SharedAccessKeyName={SERVICE_POLICY};"
            f"SharedAccessKey={self.registry.service_key}"
        )

    @property
    def devices(self) -> list[str]:
        return list(self.registry.devices())

    async def start(self) -> None:
        _raise_open_file_limit()
        try:
            SECRETS.add(self.registry.service_key)
            await self.broker.start()
            self._spawn(self.service.run())
            await self.service.client.wait_ready(SERVICE_READY_S)
            await self._start_rest()
            await self._start_mqtt()
        except BaseException:
            await self.stop()
            raise
        self.addresses.save(self.state)
        self.log.info(
            "devhub.started",
            rest=self.rest_url,
            mqtt=self.addresses.mqtt,
            dps=self.addresses.dps or "-",
            websockets=self.addresses.websockets or "-",
            ca=str(self.ca.cert_file),
            devices=len(self.registry.devices()),
        )

    async def stop(self) -> None:
        await self.door.close()
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.broker.stop()
        shutil.rmtree(self._private, ignore_errors=True)

    def add_device(self, device_id: str, thumbprint: str | None = None) -> dict[str, Any]:
        device = self.registry.add(device_id, thumbprint)
        _remember_keys(device)
        return device

    def connection_string(self, device_id: str) -> str:
        device = self.registry.get(device_id)
        if device is None:
            raise KeyError(device_id)
        return device_connection_string(self.hostname, device)

    async def wait_device(self, device_id: str, timeout_s: float) -> None:
        """Until the device is connected and listens for direct methods."""
        await self.service.wait_listening(device_id, timeout_s)

    def device_changed(self, device_id: str) -> None:
        """After a registry change: a disabled or deleted device loses its sessions."""
        device = self.registry.get(device_id)
        if device is not None:
            _remember_keys(device)
        if device is None or device["status"] != "enabled":
            closed = self.door.disconnect("device", device_id)
            if closed:
                self.log.info("devhub.device_disconnected", device=device_id, sessions=closed)
        if device is None:
            self.service.forget(device_id)

    # -- internals ------------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _server_tls(self, name: str, host: str) -> ssl.SSLContext:
        pair = self.ca.issue(name, sorted({host, "127.0.0.1", "localhost"}))
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(pair.cert_file, pair.key_file)
        # X.509 devices: a certificate is asked for, not required; access.py checks thumbprints.
        tls.verify_mode = ssl.CERT_OPTIONAL
        tls.load_verify_locations(cafile=str(self.ca.cert_file))
        return tls

    async def _start_rest(self) -> None:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        pair = self.ca.issue("rest", sorted({self.rest_host, "127.0.0.1", "localhost"}))
        tls.load_cert_chain(pair.cert_file, pair.key_file)
        api = HubRestApi(
            {self.hub_name, self.rest_host}, self.registry, self.service, self.device_changed
        )
        await self._serve(api.app(), self.rest_host, self.rest_port, tls, "REST endpoint")

    async def _start_mqtt(self) -> None:
        listeners: dict[tuple[str, int], set[str]] = {(self.hostname, self.mqtt_port): {"device"}}
        if self.dps_address is not None:
            listeners.setdefault(self.dps_address, set()).add("registration")
        for (host, port), kinds in listeners.items():
            tls = self._server_tls(f"mqtt-{host}-{port}", host)
            try:
                await self.door.listen_tls(
                    host, port, tls, functools.partial(self._authenticate, kinds=kinds)
                )
            except OSError as exc:
                raise OSError(
                    exc.errno, f"devhub MQTT endpoint {host}:{port}: {exc.strerror}"
                ) from None
        if self.websocket_port is not None:
            tls = self._server_tls(f"ws-{self.hostname}-{self.websocket_port}", self.hostname)
            app = websocket_app(
                self.door, WEBSOCKET_PATH, functools.partial(self._authenticate, kinds={"device"})
            )
            await self._serve(app, self.hostname, self.websocket_port, tls, "MQTT over WebSockets")

    async def _serve(
        self, app: web.Application, host: str, port: int, tls: ssl.SSLContext, what: str
    ) -> None:
        runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=2)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, host, port, ssl_context=tls)
        try:
            await site.start()
        except OSError as exc:
            raise OSError(exc.errno, f"devhub {what} {host}:{port}: {exc.strerror}") from None

    def _authenticate(
        self, connect: Connect, peer: PeerCertificate | None, *, kinds: set[str]
    ) -> Principal:
        now = time.time()
        if is_registration_username(connect.username):
            if "registration" not in kinds:
                raise Refused(CONNACK_REFUSED_NOT_AUTHORIZED, "this endpoint is not DPS")
            return authenticate_registration(
                connect,
                id_scope=self.registry.id_scope,
                individual=self.registry.individual_enrollment,
                groups=self.registry.group_enrollments,
                peer=peer,
                now=now,
            )
        if "device" not in kinds:
            raise Refused(CONNACK_REFUSED_NOT_AUTHORIZED, "this endpoint is DPS only")
        return authenticate_device(
            connect, {self.hostname}, self.registry.device_credentials, peer, now
        )


def _remember_keys(device: dict[str, Any]) -> None:
    """Device keys never reach a log line (see logs.SECRETS)."""
    keys = (device.get("authentication") or {}).get("symmetricKey") or {}
    for key in keys.values():
        if isinstance(key, str):
            SECRETS.add(key)


def _dps_address(text: str) -> tuple[str, int]:
    if text.rsplit(":", 1)[-1].isdigit():
        return split_host_port(text)
    return text, MQTT_PORT


def _raise_open_file_limit() -> None:
    """Each device holds two sockets here (client and broker) and one in mosquitto."""
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
