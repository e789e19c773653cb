"""The cloud side end to end: devhub (emulated IoT Hub) + agent + relay, consumers via the relay."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import camera_entry
from tests.support.agent import AgentRunner
from tests.support.camera import RtspCamera
from tests.support.fake_device import FakeDevice
from tests.support.net import free_port, fresh_loopback_ip
from tests.support.threadloop import ThreadLoop
from tests.support.waiting import until
from tests.test_tunnel_video import decode_frames, ffprobe
from tunnel_agent.cloud.devhub.hub import DevHub
from tunnel_agent.cloud.relay.core import TunnelRecord
from tunnel_agent.cloud.relay.runner import RunningRelay, start_relay
from tunnel_agent.cloud.relay.settings import RelaySettings
from tunnel_agent.cloud.sas import generate_sas

API_KEY = "relay-api-key-0123456789"
TOKEN_TTL_S = 3.0
METHOD_TIMEOUT_S = 5


class RawRecords(logging.Handler):
    """Records as code produced them, before any scrubbing: proof that secrets are never logged."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name} {record.getMessage()} {getattr(record, 'fields', '')}")

    def text(self) -> str:
        return "\n".join(self.lines)


@dataclass
class Cloud:
    devhub: DevHub
    relay: RunningRelay
    agent: AgentRunner
    camera: RtspCamera
    fake: FakeDevice
    routes: dict[str, int]
    records: RawRecords
    servers: ThreadLoop

    @property
    def api(self) -> str:
        return f"https://127.0.0.1:{self.relay.port}"

    def tls(self) -> Any:
        import ssl

        return ssl.create_default_context(cafile=str(self.devhub.ca.cert_file))


@pytest.fixture(scope="module")
def cloud(
    tmp_path_factory: pytest.TempPathFactory, servers: ThreadLoop, camera: RtspCamera
) -> Iterator[Cloud]:
    folder = tmp_path_factory.mktemp("cloud")
    records = RawRecords()
    logging.getLogger().addHandler(records)
    logging.getLogger().setLevel(logging.INFO)
    hub_host = fresh_loopback_ip()
    devhub = DevHub(folder / "devhub", f"{hub_host}:{free_port(hub_host)}")
    servers.run(devhub.start())
    for device_id in ("agent-cam", "fake-cam", "offline-cam"):
        devhub.add_device(device_id)
    agent = AgentRunner(
        folder / "agent",
        {
            "hub": {
                "connection_string": devhub.connection_string("agent-cam"),
                "ca_file": str(devhub.ca.cert_file),
            },
            "tunnel": {"ca_file": str(devhub.ca.cert_file)},
            "cameras": [camera_entry(camera)],
        },
    )
    fake = FakeDevice(devhub.connection_string("fake-cam"), devhub.ca.cert_file)
    servers.run(fake.start())
    relay_port = free_port()
    tls = devhub.ca.issue("relay", ["127.0.0.1"])
    routes = {"agent": free_port(), "offline": free_port(), "fake": free_port()}
    settings = RelaySettings.model_validate(
        {
            "relay": {
                "listen": f"127.0.0.1:{relay_port}",
                "public_url": f"wss://127.0.0.1:{relay_port}",
                "metrics_listen": f"127.0.0.1:{free_port()}",
                "cert_file": tls.cert_file,
                "key_file": tls.key_file,
                "api_key": API_KEY,
                "token_ttl": TOKEN_TTL_S,
                "method_timeout": METHOD_TIMEOUT_S,
                # Every consumer here comes from 127.0.0.1; the limits have tests of their own.
                "max_connections_per_source": 64,
                "new_connections_burst": 200,
                "new_connections_per_second": 50,
            },
            "iothub": {
                "service_connection_string": devhub.service_connection_string,
                "ca_file": devhub.ca.cert_file,
            },
            "routes": [
                {
                    "listen": f"127.0.0.1:{routes['agent']}",
                    "device_id": "agent-cam",
                    "local_port": camera.port,
                },
                {
                    "listen": f"127.0.0.1:{routes['offline']}",
                    "device_id": "offline-cam",
                    "local_port": 554,
                },
                {
                    "listen": f"127.0.0.1:{routes['fake']}",
                    "device_id": "fake-cam",
                    "local_port": 554,
                },
            ],
        }
    )
    relay = servers.run(start_relay(settings))
    agent.wait_connected()
    servers.run(devhub.wait_device("agent-cam", 20))
    yield Cloud(devhub, relay, agent, camera, fake, routes, records, servers)
    agent.stop()
    servers.run(fake.stop())
    servers.run(relay.stop())
    servers.run(devhub.stop())
    logging.getLogger().removeHandler(records)


def agent_closed(cloud: Cloud, relay_tunnel_id: str, timeout_s: float = 30.0) -> dict[str, Any]:
    """The agent's ``tunnel.closed`` line for the tunnel the relay calls ``relay_tunnel_id`` (its
    ``tunnel.opened`` line names the relay's endpoint, which ends with that id)."""
    endpoint = f"/v1/tunnels/{relay_tunnel_id}"

    def closed() -> dict[str, Any] | None:
        opened = [
            e["tunnel"]
            for e in cloud.agent.events("tunnel.opened")
            if str(e.get("endpoint", "")).endswith(endpoint)
        ]
        ends = [e for e in cloud.agent.events("tunnel.closed") if e.get("tunnel") in opened]
        return ends[-1] if ends else None

    cloud.agent.process.wait_for(lambda _: closed() is not None, timeout_s)
    found = closed()
    assert found is not None
    return found


async def test_ffprobe_through_the_relay_sees_h264(cloud: Cloud) -> None:
    relay = cloud.relay.relay
    # An earlier test's tunnel on this route may still be closing: its record is not this one.
    route = f"route-{cloud.routes['agent']}"
    earlier = {r.id for r in relay.history} | set(relay.tunnels)
    info = await ffprobe(f"rtsp://127.0.0.1:{cloud.routes['agent']}/test")

    assert info["streams"][0]["codec_name"] == "h264"  # type: ignore[index]

    def ours() -> list[TunnelRecord]:
        return [r for r in list(relay.history) if r.id not in earlier and r.route == route]

    await until(ours, timeout_s=10)
    [record] = ours()
    assert record.device_id == "agent-cam"
    assert record.bytes_to_consumer > 2_000 and record.bytes_to_device > 100
    closed = await asyncio.to_thread(agent_closed, cloud, record.id)
    # What the camera sent after the consumer hung up is in flight and dropped; nothing else is.
    assert 0.9 * int(closed["bytes_to_remote"]) <= record.bytes_to_consumer
    assert record.bytes_to_consumer <= int(closed["bytes_to_remote"])
    assert int(closed["bytes_to_camera"]) == record.bytes_to_device


async def test_ten_consumers_at_once_get_ten_tunnels(cloud: Cloud) -> None:
    relay = cloud.relay.relay
    # An earlier test's tunnel on this route may still be closing: let it finish, and count
    # only tunnels that were not live when this test started.
    route = f"route-{cloud.routes['agent']}"
    await until(lambda: not [t for t in relay.tunnels.values() if t.entry.id == route], 15)
    earlier = set(relay.tunnels)
    before = len(relay.history)
    url = f"rtsp://127.0.0.1:{cloud.routes['agent']}/test"
    with ThreadPoolExecutor(10) as pool:
        results = await asyncio.gather(
            *(
                asyncio.get_running_loop().run_in_executor(pool, decode_frames, url, 15)
                for _ in range(10)
            )
        )

    assert all(sizes == [(640, 360)] * 15 for sizes in results)

    def ours() -> list[TunnelRecord]:
        return [r for r in list(relay.history)[before:] if r.id not in earlier]

    await until(lambda: len(ours()) >= 10, timeout_s=10)
    new = ours()
    assert len({r.id for r in new}) == 10
    assert {r.route for r in new} == {route}
    assert all(r.bytes_to_consumer > 10_000 for r in new)


async def test_device_offline_closes_the_consumer_and_says_why(cloud: Cloud) -> None:
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", cloud.routes["offline"])
    assert await asyncio.wait_for(reader.read(), METHOD_TIMEOUT_S + 10) == b""
    writer.close()

    assert time.monotonic() - started < METHOD_TIMEOUT_S + 5
    assert "relay.tunnel_failed" in cloud.records.text()
    assert "DeviceNotOnline" in cloud.records.text()


async def test_device_that_never_answers_times_out(cloud: Cloud) -> None:
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", cloud.routes["fake"])
    call = await cloud.servers.call(cloud.fake.next_call())
    assert call.name == "tunnelOpen"
    assert await asyncio.wait_for(reader.read(), METHOD_TIMEOUT_S + 15) == b""
    writer.close()

    assert METHOD_TIMEOUT_S - 0.5 <= time.monotonic() - started < METHOD_TIMEOUT_S + 10
    assert "hub_status=504" in cloud.records.text() or "'hub_status': 504" in cloud.records.text()


async def test_device_error_answer_is_logged_with_its_body(cloud: Cloud) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", cloud.routes["fake"])
    call = await cloud.servers.call(cloud.fake.next_call())
    body = {"code": "400", "target": "localhost:554", "message": "Local port is not available"}
    await cloud.servers.call(cloud.fake.answer(call, 400, body))

    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    assert "Local port is not available" in cloud.records.text()


async def connect_device(cloud: Cloud, url: str, headers: dict[str, str]) -> int:
    async with aiohttp.ClientSession() as session:
        try:
            async with session.ws_connect(url, headers=headers, ssl=cloud.tls()) as ws:
                await ws.close()
                return 101
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status


async def test_wrong_reused_and_expired_tokens_are_refused(cloud: Cloud) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", cloud.routes["fake"])
    call = await cloud.servers.call(cloud.fake.next_call())
    url, token = call.payload["remoteEndpoint"], call.payload["remoteAuthorizationToken"]
    assert call.payload["localPort"] == 554
    assert len(base64.urlsafe_b64decode(token + "=")) == 32  # 256 random bits
    good = {"Authorization": f"Bearer {token}", "TunnelConnectionSource": "PnpDevice"}

    assert await connect_device(cloud, url, {**good, "Authorization": "Bearer wrong"}) == 401
    assert await connect_device(cloud, url, {"Authorization": f"Bearer {token}"}) == 403
    assert await connect_device(cloud, url + "x", good) == 401
    assert await connect_device(cloud, url, good) == 101  # the real device
    assert await connect_device(cloud, url, good) == 401  # used once already
    await cloud.servers.call(cloud.fake.answer(call, 200, {"tunnelId": "fake"}))
    assert await asyncio.wait_for(reader.read(), 10) == b""  # that device left: consumer closed
    writer.close()

    reader, writer = await asyncio.open_connection("127.0.0.1", cloud.routes["fake"])
    call = await cloud.servers.call(cloud.fake.next_call())
    await asyncio.sleep(TOKEN_TTL_S + 0.5)
    expired = {
        "Authorization": f"Bearer {call.payload['remoteAuthorizationToken']}",
        "TunnelConnectionSource": "PnpDevice",
    }
    assert await connect_device(cloud, call.payload["remoteEndpoint"], expired) == 401
    await cloud.servers.call(cloud.fake.answer(call, 200, {}))
    assert await asyncio.wait_for(reader.read(), 20) == b""
    writer.close()
    text = cloud.records.text()
    assert "wrong token" in text and "token already used" in text and "expired token" in text


async def test_session_api_needs_its_key_and_opens_working_listeners(cloud: Cloud) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=cloud.tls())) as http:
        body = {"deviceId": "agent-cam", "localPort": cloud.camera.port}
        for headers in (
            {},
            {"Authorization": "Bearer wrong-key-wrong-key"},
            {"Authorization": API_KEY},
        ):
            async with http.post(
                f"{cloud.api}/v1/sessions", json=body, headers=headers
            ) as response:
                assert response.status == 401
        auth = {"Authorization": f"Bearer {API_KEY}"}
        async with http.post(
            f"{cloud.api}/v1/sessions", json={"deviceId": "x"}, headers=auth
        ) as response:
            assert response.status == 400
        async with http.post(f"{cloud.api}/v1/sessions", json=body, headers=auth) as response:
            assert response.status == 201
            session = await response.json()
        host, port = session["address"].rsplit(":", 1)

        info = await ffprobe(f"rtsp://{host}:{port}/test")
        assert info["streams"][0]["codec_name"] == "h264"  # type: ignore[index]

        async with http.get(f"{cloud.api}/v1/sessions", headers=auth) as response:
            assert session["id"] in {s["id"] for s in (await response.json())["sessions"]}
        async with http.delete(
            f"{cloud.api}/v1/sessions/{session['id']}", headers=auth
        ) as response:
            assert response.status == 204
        with pytest.raises(OSError):
            await asyncio.open_connection(host, int(port))


async def test_devhub_rest_refuses_bad_signatures(cloud: Cloud) -> None:
    key = cloud.devhub.service_connection_string.split("SharedAccessKey=")[1]
    hub = cloud.devhub.hub_name
    url = f"{cloud.devhub.rest_url}/twins/agent-cam/methods?api-version=2021-04-12"
    body = {"methodName": "tunnelOpen", "payload": {}, "responseTimeoutInSeconds": 5}
    future = int(time.time()) + 600
    cases = {
        "none": "",
        "wrong key": generate_sas(hub, "d3Jvbmcta2V5LXdyb25nLWtleQ==", "service", future),
        "expired": generate_sas(hub, key, "service", int(time.time()) - 10),
        "wrong key name": generate_sas(hub, key, "owner", future),
        "other hub": generate_sas("other.example.net", key, "service", future),
    }
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=cloud.tls())) as http:
        for name, sas in cases.items():
            async with http.post(url, json=body, headers={"Authorization": sas}) as response:
                assert response.status == 401, name
        good = {"Authorization": generate_sas(hub, key, "service", future)}
        async with http.post(url, json=body, headers=good) as response:
            assert response.status == 200
            answer = await response.json()
        assert answer["status"] == 400  # the agent validated the empty payload
        async with http.get(f"{cloud.devhub.rest_url}/twins/agent-cam", headers=good) as response:
            twin = await response.json()
        assert twin["connectionState"] == "Connected"
        async with http.post(
            url.replace("agent-cam", "nobody"), json=body, headers=good
        ) as response:
            assert response.status == 404


async def test_no_token_or_key_in_any_log(cloud: Cloud, tmp_path: Path) -> None:
    relay = cloud.relay.relay
    route = f"route-{cloud.routes['agent']}"
    earlier = {r.id for r in relay.history} | set(relay.tunnels)
    await ffprobe(f"rtsp://127.0.0.1:{cloud.routes['agent']}/test")
    # A token of this test's own, refused by the device, so that one failure is logged too.
    reader, writer = await asyncio.open_connection("127.0.0.1", cloud.routes["fake"])
    call = await cloud.servers.call(cloud.fake.next_call())
    refusal = {"code": "400", "target": "localhost:554", "message": "Local port is not available"}
    await cloud.servers.call(cloud.fake.answer(call, 400, refusal))
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()

    # Both tunnels are over on every side: all their lines have been written (counts alone could
    # be met by an earlier test's tunnel that was still closing).
    def ours() -> list[TunnelRecord]:
        return [r for r in list(relay.history) if r.id not in earlier and r.route == route]

    await until(ours, timeout_s=10)
    await asyncio.to_thread(agent_closed, cloud, ours()[0].id)
    text = cloud.records.text() + cloud.agent.output()
    secrets = [API_KEY, cloud.devhub.service_connection_string.split("SharedAccessKey=")[1]]
    secrets += [
        key
        for device in cloud.devhub.registry.devices().values()
        for key in device["authentication"]["symmetricKey"].values()
    ]
    secrets.append(call.payload["remoteAuthorizationToken"])
    secrets += [c.payload["remoteAuthorizationToken"] for c in cloud.fake.seen]
    assert len(secrets) >= 6
    for secret in secrets:
        assert secret not in text
    assert "Bearer " not in text
    assert "remoteAuthorizationToken" not in text
