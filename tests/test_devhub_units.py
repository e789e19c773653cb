"""The devhub's pure parts: the MQTT codec, who may connect and what they may touch, queries,
the registry's etags. No sockets: these are the decisions the front door and the REST API make."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tunnel_agent.cloud.devhub import mqtt_codec as mqtt
from tunnel_agent.cloud.devhub.access import (
    CONNACK_REFUSED_NOT_AUTHORIZED,
    DeviceCredentials,
    EnrollmentCredentials,
    PeerCertificate,
    Refused,
    authenticate_device,
    authenticate_registration,
    derive_device_key,
    device_principal,
    plan_subscribe,
)
from tunnel_agent.cloud.devhub.query import QueryError, parse_query
from tunnel_agent.cloud.devhub.registry import DeviceRegistry, RegistryError
from tunnel_agent.cloud.devhub.twins import Twin

KEY = base64.b64encode(b"k" * 32).decode()
OTHER_KEY = base64.b64encode(b"o" * 32).decode()
HUB = "127.9.9.9"


def sdk_sas(resource: str, key: str, expiry: int, key_name: str | None = None) -> str:
    """A SAS exactly as azure-iot-device builds it: the resource URL-encoded, case kept."""
    encoded = quote(resource, safe="")
    digest = hmac.new(base64.b64decode(key), f"{encoded}\n{expiry}".encode(), hashlib.sha256)
    signature = quote(base64.b64encode(digest.digest()).decode(), safe="")
    token = f"SharedAccessSignature sr={encoded}&sig={signature}&se={expiry}"
    return token + (f"&skn={key_name}" if key_name else "")


def device_connect(
    device_id: str = "Cam-1",
    *,
    key: str = KEY,
    expiry_offset_s: int = 600,
    resource: str | None = None,
    username: str | None = None,
    password: bool = True,
) -> mqtt.Connect:
    expiry = int(time.time()) + expiry_offset_s
    token = sdk_sas(resource or f"{HUB}/devices/{device_id}", key, expiry)
    return mqtt.Connect(
        device_id,
        False,
        60,
        username
        if username is not None
        else f"{HUB}/{device_id}/?api-version=2021-04-12"
        "&model-id=dtmi%3Aazure%3Avideoanalyzer%3AWebSocketTunneling%3B1",
        token.encode() if password else None,
    )


def lookup(enabled: bool = True, thumbprint: str = "") -> object:
    def find(device_id: str) -> DeviceCredentials | None:
        if device_id != "Cam-1":
            return None
        return DeviceCredentials(device_id, enabled, (OTHER_KEY, KEY), (thumbprint,))

    return find


# -- codec ---------------------------------------------------------------------------------------


def test_connect_round_trip_and_split_feeding() -> None:
    connect = mqtt.Connect("cam", False, 60, "hub/cam/?api-version=1", b"secret")
    data = mqtt.encode_connect(connect) + mqtt.encode_publish(
        mqtt.Publish("a/b", b"x" * 300, 1, packet_id=7)
    )
    reader = mqtt.PacketReader(1024)
    packets = [p for byte in data for p in reader.feed(bytes([byte]))]  # one byte at a time
    assert [p.kind for p in packets] == [mqtt.CONNECT, mqtt.PUBLISH]
    assert mqtt.parse_connect(packets[0].body) == connect
    publish = mqtt.parse_publish(packets[1].flags, packets[1].body)
    assert (publish.topic, publish.payload, publish.qos, publish.packet_id) == (
        "a/b",
        b"x" * 300,
        1,
        7,
    )


def test_rewriting_a_topic_keeps_flags_packet_id_and_payload() -> None:
    original = mqtt.encode_publish(mqtt.Publish("$iothub/x", b"{}", 1, retain=True, packet_id=9))
    packet = mqtt.PacketReader(1024).feed(original)[0]
    moved = mqtt.PacketReader(1024).feed(
        mqtt.with_topic(packet.flags, packet.body, "d/c/$iothub/x")
    )[0]
    publish = mqtt.parse_publish(moved.flags, moved.body)
    assert (publish.topic, publish.payload, publish.packet_id, publish.retain) == (
        "d/c/$iothub/x",
        b"{}",
        9,
        True,
    )


def test_codec_refuses_what_mqtt_forbids() -> None:
    with pytest.raises(mqtt.ProtocolError, match="over 100"):
        mqtt.PacketReader(100).feed(mqtt.encode_publish(mqtt.Publish("t", b"x" * 200)))
    with pytest.raises(mqtt.ProtocolError, match="remaining length"):
        mqtt.PacketReader(100).feed(b"\x30\xff\xff\xff\xff\x01")
    mqtt5 = bytes.fromhex("00044d51545405020000")  # "MQTT", level 5
    with pytest.raises(mqtt.UnsupportedProtocol):
        mqtt.parse_connect(mqtt5)
    with pytest.raises(mqtt.ProtocolError, match="ends early"):
        mqtt.parse_connect(bytes.fromhex("00044d5154540402003c00"))
    with pytest.raises(mqtt.ProtocolError, match="QoS 3"):
        mqtt.parse_publish(0x06, b"\x00\x01t\x00\x01")


# -- who may connect -----------------------------------------------------------------------------


def test_a_device_with_its_sas_is_let_in_with_its_model_id() -> None:
    principal = authenticate_device(device_connect(), {HUB}, lookup(), None, time.time())
    assert (principal.kind, principal.name) == ("device", "Cam-1")
    assert principal.model_id == "dtmi:azure:videoanalyzer:WebSocketTunneling;1"
    assert principal.expires_at is not None and principal.expires_at > time.time()


@pytest.mark.parametrize(
    ("connect_args", "reason"),
    [
        ({"key": base64.b64encode(b"w" * 32).decode()}, "does not match"),
        ({"expiry_offset_s": -5}, "expired"),
        ({"resource": f"{HUB}/devices/Other"}, "another resource"),
        ({"resource": "other.hub/devices/Cam-1"}, "another resource"),
        ({"username": f"{HUB}/Other/?api-version=1"}, "another device"),
        ({"username": "other.hub/Cam-1/?api-version=1"}, "another hub"),
        ({"username": f"{HUB}/Cam-1/mod/?api-version=1"}, "user name is not"),
        ({"username": ""}, "user name is not"),
        ({"password": False}, "no SAS and no client certificate"),
        ({"device_id": "Nobody"}, "unknown device"),
    ],
)
def test_refusals_say_why_and_answer_connack_5(connect_args: dict[str, Any], reason: str) -> None:
    # Made when the test runs, not at collection: the SAS's expiry is relative to now.
    connect = device_connect(**connect_args)
    with pytest.raises(Refused, match=reason) as refused:
        authenticate_device(connect, {HUB}, lookup(), None, time.time())
    assert refused.value.code == CONNACK_REFUSED_NOT_AUTHORIZED


def test_a_disabled_device_is_refused_even_with_its_key() -> None:
    with pytest.raises(Refused, match="disabled"):
        authenticate_device(device_connect(), {HUB}, lookup(enabled=False), None, time.time())


def test_x509_devices_are_known_by_thumbprint() -> None:
    der = b"certificate bytes"
    peer = PeerCertificate.from_der(der)
    sha1 = hashlib.sha1(der).hexdigest().upper()
    connect = device_connect(password=False)
    principal = authenticate_device(connect, {HUB}, lookup(thumbprint=sha1), peer, time.time())
    assert principal.name == "Cam-1" and principal.expires_at is None
    with pytest.raises(Refused, match="thumbprint"):
        authenticate_device(connect, {HUB}, lookup(thumbprint="AB" * 20), peer, time.time())


def test_dps_checks_individual_and_group_keys_and_certificates() -> None:
    scope, now = "0ne00AB12", time.time()
    individual = EnrollmentCredentials("gw-1", False, keys=(KEY,))
    group = EnrollmentCredentials("fleet", True, keys=(OTHER_KEY,))

    def connect(registration: str, key: str | None) -> mqtt.Connect:
        username = f"{scope}/registrations/{registration}/api-version=2019-03-31"
        token = None
        if key is not None:
            token = sdk_sas(f"{scope}/registrations/{registration}", key, int(now) + 60)
            token += "&skn=registration"
        return mqtt.Connect(registration, True, 60, username, token.encode() if token else None)

    def check(registration: str, key: str | None, peer: PeerCertificate | None = None) -> str:
        principal = authenticate_registration(
            connect(registration, key),
            id_scope=scope,
            individual=lambda r: individual if r == "gw-1" else None,
            groups=lambda: [group],
            peer=peer,
            now=now,
        )
        assert principal.enrollment is not None
        return principal.enrollment

    assert check("gw-1", KEY) == "individual/gw-1"
    assert check("gw-7", derive_device_key(OTHER_KEY, "gw-7")) == "group/fleet"
    with pytest.raises(Refused, match="matches no enrollment"):
        check("gw-7", OTHER_KEY)  # the group key itself is not a device key
    with pytest.raises(Refused, match="matches no enrollment"):
        check("gw-1", derive_device_key(OTHER_KEY, "gw-1"))  # enrolled alone: its own key only
    peer = PeerCertificate.from_der(b"cert")
    individual = EnrollmentCredentials("gw-1", False, thumbprints=(peer.sha256,))
    assert check("gw-1", None, peer) == "individual/gw-1"


# -- what a device may touch ---------------------------------------------------------------------


def test_a_device_only_names_topics_under_its_own_prefix() -> None:
    cam = device_principal("cam1")
    assert (
        cam.inbound_topic("$iothub/methods/res/200/?$rid=1")
        == "d/cam1/$iothub/methods/res/200/?$rid=1"
    )
    assert (
        cam.inbound_topic("devices/cam1/messages/events/") == "d/cam1/devices/cam1/messages/events/"
    )
    for forbidden in ("devices/cam2/messages/events/", "$iothub/methods/POST/x", "d/cam2/x", "a/#"):
        assert cam.inbound_topic(forbidden) is None, forbidden
    assert (
        cam.outbound_topic("d/cam1/$iothub/methods/POST/m/?$rid=4")
        == "$iothub/methods/POST/m/?$rid=4"
    )
    assert cam.outbound_topic("d/cam2/$iothub/methods/POST/m/?$rid=4") is None


def test_subscriptions_outside_iot_hubs_topics_get_0x80() -> None:
    plan = plan_subscribe(
        device_principal("cam1"),
        [
            ("#", 1),
            ("$iothub/methods/POST/#", 2),
            ("d/cam2/$iothub/methods/POST/#", 0),
            ("$iothub/twin/res/#", 0),
        ],
    )
    assert plan.forwarded == [
        ("d/cam1/$iothub/methods/POST/#", 1),
        ("d/cam1/$iothub/twin/res/#", 0),
    ]
    assert plan.merge([1, 0]) == [0x80, 1, 0x80, 0]


# -- queries, twins, the registry ----------------------------------------------------------------


def test_queries_filter_on_device_id_and_reported_properties() -> None:
    twins = [
        {"deviceId": "a", "properties": {"reported": {"fw": "1.2", "fps": 15}}, "tags": {}},
        {"deviceId": "b", "properties": {"reported": {"fw": "1.3", "fps": 30}}, "tags": {}},
        {"deviceId": "it's", "properties": {"reported": {}}, "tags": {"site": "lab"}},
    ]

    def ids(text: str) -> list[str]:
        query = parse_query(text)
        return [t["deviceId"] for t in twins if query.matches(t)]  # type: ignore[index]

    assert ids("SELECT * FROM devices") == ["a", "b", "it's"]
    assert ids("select * from devices where deviceId = 'b'") == ["b"]
    assert ids("SELECT * FROM devices WHERE deviceId = 'it''s'") == ["it's"]
    assert ids("SELECT * FROM devices WHERE properties.reported.fw = '1.2'") == ["a"]
    assert ids("SELECT * FROM devices WHERE properties.reported.fps >= 15 AND deviceId != 'a'") == [
        "b"
    ]
    assert ids("SELECT * FROM devices WHERE tags.site = 'lab'") == ["it's"]
    for bad in (
        "SELECT deviceId FROM devices",
        "SELECT * FROM devices WHERE x",
        "SELECT * FROM devices WHERE a = 1 OR b = 2",
    ):
        with pytest.raises(QueryError):
            parse_query(bad)


def test_twin_versions_etags_and_replacing_desired() -> None:
    twin = Twin()
    etag = twin.etag
    assert twin.patch_desired({"a": 1, "b": {"c": 2}}) == 2
    assert twin.etag != etag
    assert twin.replace_desired({"b": {"d": 3}}) == {"a": None, "b": {"d": 3}}
    assert twin.desired == {"b": {"d": 3}, "$version": 3}
    assert twin.patch_reported({"fw": "1", "$version": 99}) == 2  # the device cannot set versions


def test_registry_etags_and_if_match(tmp_path: Path) -> None:
    registry = DeviceRegistry(tmp_path)
    created = registry.put("cam", {"deviceId": "cam"}, None)
    keys = created["authentication"]["symmetricKey"]
    assert (
        len(base64.b64decode(keys["primaryKey"])) == 32
        and keys["primaryKey"] != keys["secondaryKey"]
    )
    with pytest.raises(RegistryError) as exists:
        registry.put("cam", {"deviceId": "cam"}, None)
    assert (exists.value.status, exists.value.code) == (409, "DeviceAlreadyExists")
    with pytest.raises(RegistryError) as stale:
        registry.put("cam", {"status": "disabled"}, '"not-the-etag"')
    assert (stale.value.status, stale.value.code) == (412, "PreconditionFailed")
    updated = registry.put(
        "cam", {"status": "disabled", "statusReason": "test"}, f'"{created["etag"]}"'
    )
    assert updated["etag"] != created["etag"] and updated["status"] == "disabled"
    assert updated["authentication"] == created["authentication"]  # kept when not sent
    assert DeviceRegistry(tmp_path).get("cam") == updated  # another process sees it
    with pytest.raises(RegistryError) as missing:
        registry.delete("nobody", None)
    assert missing.value.status == 404
    with pytest.raises(RegistryError):
        registry.put("bad/id", {}, None)


def test_only_granted_filters_count_as_subscribed() -> None:
    plan = plan_subscribe(device_principal("cam1"), [("#", 1), ("$iothub/methods/POST/#", 1)])
    assert plan.granted([1]) == ["$iothub/methods/POST/#"]
    assert plan.granted([0x80]) == []  # the broker refused it: the device does not listen
