"""Who gets onto the hub: SAS checks, X.509 thumbprints, DPS attestation, isolation of devices.

Every device here reaches the devhub's one MQTT endpoint, as devices reach IoT Hub; each refusal
is proved both ways: the client gets CONNACK 5 and, after it, nothing but the end of the stream.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

from tests.support.agent import AgentRunner
from tests.support.fake_device import FakeDevice
from tests.support.hub import HubHarness
from tests.support.threadloop import ThreadLoop
from tunnel_agent.cloud.devhub import mqtt_codec as mqtt
from tunnel_agent.cloud.devhub.access import derive_device_key
from tunnel_agent.cloud.devhub.certs import LocalCA
from tunnel_agent.cloud.devhub.cli import certificate_thumbprint
from tunnel_agent.cloud.devhub.topics import topic_query
from tunnel_agent.cloud.sas import generate_sas
from tunnel_agent.tunnel.contract import MODEL_ID

CONNACK_NOT_AUTHORIZED = 5


@pytest.fixture(scope="module")
def dps_hub(
    tmp_path_factory: pytest.TempPathFactory, ca: LocalCA, servers: ThreadLoop
) -> Iterator[HubHarness]:
    """A hub that also serves DPS on its own address (one endpoint, as the SDK needs 8883)."""
    harness = HubHarness(
        tmp_path_factory.mktemp("dps"), ca, servers, device_id="dps-unused", dps=True
    )
    yield harness
    harness.stop()


async def assert_method_round_trip(hub: HubHarness, device_id: str) -> None:
    payload = {"remoteEndpoint": "wss://relay.example.net/t", "remoteAuthorizationToken": "t"}
    link = hub.device_link(device_id)
    status, body = await hub.loop.call(link.invoke("tunnelOpen", {**payload, "localPort": 9}, 30))
    assert (status, body["target"]) == (400, "localhost:9")


def unique(name: str) -> str:
    return f"{name}-{secrets.token_hex(3)}"


def device_credentials(hub: HubHarness, device_id: str, key: str, expiry: int) -> dict[str, str]:
    return {
        "username": f"{hub.host}/{device_id}/?api-version=2021-04-12",
        "password": generate_sas(f"{hub.host}/devices/{device_id}", key, None, expiry),
    }


def raw_connect(hub: HubHarness, connect: mqtt.Connect) -> tuple[int, bytes]:
    """CONNECT over TLS with a bare socket; (CONNACK code, all bytes the hub sent afterwards).

    After the CONNACK the client subscribes to everything anyway and reads until the hub
    closes: the end of the stream is the event that proves nothing else was coming.
    """
    tls = ssl.create_default_context(cafile=str(hub.ca.cert_file))
    with (
        socket.create_connection((hub.host, 8883), timeout=10) as raw,
        tls.wrap_socket(raw, server_hostname=hub.host) as sock,
    ):
        sock.sendall(mqtt.encode_connect(connect))
        reader = mqtt.PacketReader(65536)
        packets: list[mqtt.Packet] = []
        while not packets:
            data = sock.recv(65536)
            assert data, "closed before CONNACK"
            packets = reader.feed(data)
        assert packets[0].kind == mqtt.CONNACK
        _, code = mqtt.parse_connack(packets[0].body)
        later = b"".join(p.encode() for p in packets[1:])
        try:
            sock.sendall(mqtt.encode_subscribe(1, [("#", 1), ("$iothub/methods/POST/#", 1)]))
            while chunk := sock.recv(65536):
                later += chunk
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
            pass
        return code, later


async def test_connection_string_sends_the_pnp_model_id(tmp_path: Path, hub: HubHarness) -> None:
    device_id = unique("pnp-cam")
    agent = AgentRunner(
        tmp_path,
        {
            "hub": {**hub.hub_config(), "connection_string": hub.add_device(device_id)},
            "cameras": [],
        },
    )
    try:
        agent.wait_connected()
        hub.wait_device(device_id=device_id)
        await assert_method_round_trip(hub, device_id)
        assert hub.device_link(device_id).twin.model_id == MODEL_ID  # from this agent's CONNECT
    finally:
        agent.stop()


async def test_x509_device_certificate_by_thumbprint(
    tmp_path: Path, ca: LocalCA, hub: HubHarness
) -> None:
    device_id = unique("x509-cam")
    device = ca.issue(f"device-{device_id}", [device_id])
    stranger = ca.issue(f"stranger-{device_id}", [device_id])
    hub.devhub.add_device(device_id, thumbprint=certificate_thumbprint(device.cert_file))

    def x509_agent(folder: str, pair: object) -> AgentRunner:
        return AgentRunner(
            tmp_path / folder,
            {
                "hub": {
                    "hostname": hub.host,
                    "device_id": device_id,
                    "cert_file": str(pair.cert_file),  # type: ignore[attr-defined]
                    "key_file": str(pair.key_file),  # type: ignore[attr-defined]
                    "ca_file": str(ca.cert_file),
                    "retry_interval": 1,
                },
                "cameras": [],
            },
        )

    wrong = x509_agent("stranger", stranger)
    try:
        wrong.wait_event("hub.connect_failed")
        assert not wrong.events("hub.connected")
    finally:
        wrong.stop()
    agent = x509_agent("agent", device)
    try:
        agent.wait_connected()
        hub.wait_device(device_id=device_id)
        await assert_method_round_trip(hub, device_id)
        assert hub.device_link(device_id).twin.model_id == MODEL_ID
    finally:
        agent.stop()


@pytest.mark.parametrize("kind", ["individual key", "group key", "x509"])
async def test_dps_attestation_then_the_assigned_hub(
    tmp_path: Path, ca: LocalCA, dps_hub: HubHarness, kind: str
) -> None:
    registration_id = unique("gw")
    registry = dps_hub.devhub.registry
    hub_config: dict[str, object] = {
        "id_scope": registry.id_scope,
        "registration_id": registration_id,
        "provisioning_host": dps_hub.host,
        "ca_file": str(ca.cert_file),
        "retry_interval": 1,
    }
    wrong_key = base64.b64encode(secrets.token_bytes(32)).decode()
    if kind == "individual key":
        enrollment = registry.add_enrollment(registration_id, group=False)
        hub_config["symmetric_key"] = key = enrollment["primaryKey"]
    elif kind == "group key":
        group = registry.add_enrollment(unique("fleet"), group=True)
        hub_config["symmetric_key"] = key = derive_device_key(group["primaryKey"], registration_id)
        wrong_key = group["primaryKey"]  # the group key itself does not attest a device
    else:
        pair = ca.issue(f"dps-{registration_id}", [registration_id])
        registry.add_enrollment(
            registration_id, group=False, thumbprint=certificate_thumbprint(pair.cert_file)
        )
        hub_config |= {"cert_file": str(pair.cert_file), "key_file": str(pair.key_file)}
        key = ""
    if kind != "x509":
        refused = AgentRunner(
            tmp_path / "wrong", {"hub": {**hub_config, "symmetric_key": wrong_key}, "cameras": []}
        )
        try:
            refused.wait_event("hub.connect_failed")
            assert not refused.events("hub.connected")
        finally:
            refused.stop()
        assert registry.get(registration_id) is None  # a refused registration creates nothing

    agent = AgentRunner(tmp_path / "agent", {"hub": hub_config, "cameras": []})
    try:
        agent.wait_connected(timeout_s=40)
        assert agent.events("hub.connected")[0]["device"] == registration_id
        dps_hub.wait_device(device_id=registration_id)
        await assert_method_round_trip(dps_hub, registration_id)
        assert dps_hub.device_link(registration_id).twin.model_id == MODEL_ID
        assert dps_hub.devhub.dps.registrations[registration_id].payload == {"modelId": MODEL_ID}
        if key:
            assert key not in agent.output()
    finally:
        agent.stop()


@pytest.mark.parametrize("case", ["wrong key", "expired SAS", "disabled device", "anonymous"])
def test_refused_clients_get_connack_5_and_nothing_else(hub: HubHarness, case: str) -> None:
    device_id = unique("victim")
    hub.add_device(device_id)
    key = hub.devhub.registry.get(device_id)["authentication"]["symmetricKey"]["primaryKey"]  # type: ignore[index]
    expiry = int(time.time()) + 600
    if case == "wrong key":
        credentials = device_credentials(
            hub, device_id, base64.b64encode(b"w" * 32).decode(), expiry
        )
    elif case == "expired SAS":
        credentials = device_credentials(hub, device_id, key, int(time.time()) - 1)
    elif case == "disabled device":
        etag = hub.devhub.registry.get(device_id)["etag"]  # type: ignore[index]
        hub.devhub.registry.put(device_id, {"status": "disabled"}, etag)
        credentials = device_credentials(hub, device_id, key, expiry)
    else:
        credentials = {}
    connect = mqtt.Connect(
        device_id,
        True,
        60,
        credentials.get("username"),
        credentials["password"].encode() if "password" in credentials else None,
    )
    code, later = raw_connect(hub, connect)
    assert code == CONNACK_NOT_AUTHORIZED
    assert later == b""  # closed right after the refusal: no SUBACK, no message


async def test_a_device_never_sees_another_devices_topics(hub: HubHarness) -> None:
    mine, theirs = unique("mine"), unique("theirs")
    hub.add_device(mine)
    other = FakeDevice(hub.add_device(theirs), hub.ca.cert_file)
    await hub.loop.call(other.start())
    key = hub.devhub.registry.get(mine)["authentication"]["symmetricKey"]["primaryKey"]  # type: ignore[index]
    tls = ssl.create_default_context(cafile=str(hub.ca.cert_file))
    received: list[str] = []

    async def theirs_round_trip() -> tuple[int, object]:
        """On the hub's loop, where the other device lives: invoke, let it answer."""
        call = asyncio.create_task(hub.device_link(theirs).invoke(f"{theirs}-probe", {}, 15))
        await other.answer(await other.next_call(), 200, {})
        return await call

    try:
        async with aiomqtt.Client(
            hub.host,
            8883,
            identifier=mine,
            tls_context=tls,
            **device_credentials(hub, mine, key, int(time.time()) + 600),
        ) as client:
            granted = await client.subscribe(
                [
                    ("#", 1),
                    (f"d/{theirs}/$iothub/methods/POST/#", 1),
                    (f"devices/{theirs}/messages/devicebound/#", 1),
                    ("$iothub/methods/POST/#", 1),
                ]
            )
            assert list(granted) == [0x80, 0x80, 0x80, 1]
            hub.wait_device(device_id=mine)

            async def collect() -> None:
                async for message in client.messages:
                    topic = str(message.topic)
                    received.append(topic)
                    if f"/{mine}-probe/" in topic:
                        rid = topic_query(topic)["$rid"]
                        await client.publish(f"$iothub/methods/res/200/?$rid={rid}", b"{}")
                        return

            collector = asyncio.create_task(collect())
            status, _ = await hub.loop.call(theirs_round_trip())
            assert status == 200
            # Then one for this device: once it arrives, the other's would have come before it.
            status, _ = await hub.loop.call(hub.device_link(mine).invoke(f"{mine}-probe", {}, 15))
            assert status == 200
            await asyncio.wait_for(collector, 5)
        assert len(received) == 1 and received[0].startswith(f"$iothub/methods/POST/{mine}-probe/")
        assert all(c.name.startswith(theirs) for c in other.seen)
    finally:
        await hub.loop.call(other.stop())


async def test_a_session_ends_when_its_sas_expires(hub: HubHarness) -> None:
    device_id = unique("short-sas")
    hub.add_device(device_id)
    key = hub.devhub.registry.get(device_id)["authentication"]["symmetricKey"]["primaryKey"]  # type: ignore[index]
    tls = ssl.create_default_context(cafile=str(hub.ca.cert_file))
    expiry = int(time.time()) + 3
    connected = False
    with pytest.raises(aiomqtt.MqttError, match="connection was lost"):
        async with aiomqtt.Client(
            hub.host,
            8883,
            identifier=device_id,
            tls_context=tls,
            **device_credentials(hub, device_id, key, expiry),
        ) as client:
            await client.subscribe("$iothub/methods/POST/#")
            connected = True  # the SUBACK came: the session was open
            async with asyncio.timeout(15):
                async for _ in client.messages:
                    pass
    assert connected
    assert time.time() >= expiry  # ended by the hub at the SAS's expiry, not before
    hub.wait_device_gone(device_id=device_id)


async def test_mqtt_over_websockets_on_port_443(
    tmp_path: Path, ca: LocalCA, servers: ThreadLoop
) -> None:
    """``hub.websockets = true``: the SDK speaks MQTT inside wss://<host>:443/$iothub/websocket."""
    hub = HubHarness(tmp_path, ca, servers, device_id="ws-cam", websocket_port=443)
    agent = AgentRunner(
        tmp_path / "agent", {"hub": {**hub.hub_config(), "websockets": True}, "cameras": []}
    )
    try:
        agent.wait_connected()
        hub.wait_device()
        await assert_method_round_trip(hub, "ws-cam")
        assert hub.link.twin.model_id == MODEL_ID
        sessions = hub.devhub.door.sessions[("device", "ws-cam")]
        assert [session.transport for session in sessions] == ["websocket"]
    finally:
        agent.stop()
        hub.stop()
