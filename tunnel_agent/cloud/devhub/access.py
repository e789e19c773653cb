"""Who may connect through the front door, and what each client may publish and subscribe to.

Pure decisions over plain data, as IoT Hub and DPS make them:

* a device connects with client id = device id, user name ``<hub>/<device id>/?api-version=..``
  and either a SAS (signed with one of its keys, for ``<hub>/devices/<device id>``, not expired)
  or a TLS client certificate whose thumbprint is registered for it;
* a DPS client connects with user name ``<id scope>/registrations/<registration id>/..`` and a
  SAS for ``<id scope>/registrations/<registration id>`` (individual key, or a group key derived
  for the registration id) or an enrolled certificate.

IoT Hub's device topics carry no device id; one broker carries every device, so each client's
topics are moved under its own prefix (``d/<device id>/``, ``p/<registration id>/``) on the way in
and the prefix is taken off on the way out. A client can only name topics under its own prefix,
and within it only the topics IoT Hub defines.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qs

from tunnel_agent.cloud.devhub.mqtt_codec import SUBACK_FAILURE, Connect
from tunnel_agent.cloud.sas import InvalidSignature, SasToken, check_sas, parse_sas

CONNACK_REFUSED_PROTOCOL = 1
CONNACK_REFUSED_IDENTIFIER = 2
CONNACK_SERVER_UNAVAILABLE = 3
CONNACK_REFUSED_NOT_AUTHORIZED = 5
MAX_QOS = 1  # IoT Hub has no QoS 2

DEVICE_PREFIX = "d/"
REGISTRATION_PREFIX = "p/"


class Refused(Exception):
    """The client may not connect; ``code`` is the CONNACK return code, the message says why."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


@dataclass(frozen=True)
class PeerCertificate:
    """The TLS client certificate, as the handshake verified it (chain to a trusted CA)."""

    sha1: str
    sha256: str

    @classmethod
    def from_der(cls, der: bytes) -> PeerCertificate:
        return cls(
            hashlib.sha1(der, usedforsecurity=False).hexdigest().upper(),
            hashlib.sha256(der).hexdigest().upper(),
        )

    def matches(self, thumbprints: Sequence[str]) -> bool:
        wanted = {t.replace(":", "").upper() for t in thumbprints if t}
        return self.sha1 in wanted or self.sha256 in wanted


@dataclass(frozen=True)
class DeviceCredentials:
    """What the registry knows of a device that matters for connecting."""

    device_id: str
    enabled: bool
    keys: tuple[str, ...] = ()
    thumbprints: tuple[str, ...] = ()


@dataclass(frozen=True)
class EnrollmentCredentials:
    """A DPS enrollment: individual (``registration_id``) or a group (any registration id)."""

    name: str
    group: bool
    enabled: bool = True
    keys: tuple[str, ...] = ()
    thumbprints: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """How the registry names it: ``individual/<id>`` or ``group/<name>``."""
        return f"{'group' if self.group else 'individual'}/{self.name}"


@dataclass(frozen=True)
class Principal:
    """An authenticated client: a device on the hub, or a registration on DPS."""

    kind: str  # "device" | "registration"
    name: str
    model_id: str | None = None
    expires_at: float | None = None  # a SAS ends the session when it expires, as on IoT Hub
    enrollment: str | None = None
    publish_prefixes: tuple[str, ...] = field(default=(), repr=False)
    subscribe_filters: frozenset[str] = field(default=frozenset(), repr=False)

    @property
    def namespace(self) -> str:
        prefix = DEVICE_PREFIX if self.kind == "device" else REGISTRATION_PREFIX
        return f"{prefix}{self.name}/"

    def inbound_topic(self, topic: str) -> str | None:
        """The broker topic for a PUBLISH from this client, or None if it may not publish there."""
        if "+" in topic or "#" in topic or not topic.startswith(self.publish_prefixes):
            return None
        return self.namespace + topic

    def subscription(self, topic_filter: str, qos: int) -> tuple[str, int] | None:
        if topic_filter not in self.subscribe_filters:
            return None
        return self.namespace + topic_filter, min(qos, MAX_QOS)

    def outbound_topic(self, broker_topic: str) -> str | None:
        """The client's own name for a topic the broker delivers (None: not its own)."""
        if not broker_topic.startswith(self.namespace):
            return None
        return broker_topic[len(self.namespace) :]


def device_principal(
    device_id: str, model_id: str | None = None, expires_at: float | None = None
) -> Principal:
    return Principal(
        "device",
        device_id,
        model_id,
        expires_at,
        publish_prefixes=(
            "$iothub/methods/res/",
            "$iothub/twin/GET/",
            "$iothub/twin/PATCH/properties/reported/",
            f"devices/{device_id}/messages/events/",
        ),
        subscribe_filters=frozenset(
            {
                "$iothub/methods/POST/#",
                "$iothub/twin/res/#",
                "$iothub/twin/PATCH/properties/desired/#",
                f"devices/{device_id}/messages/devicebound/#",
            }
        ),
    )


def registration_principal(
    registration_id: str, enrollment: str, expires_at: float | None = None
) -> Principal:
    return Principal(
        "registration",
        registration_id,
        None,
        expires_at,
        enrollment,
        publish_prefixes=(
            "$dps/registrations/PUT/iotdps-register/",
            "$dps/registrations/GET/iotdps-get-operationstatus/",
        ),
        subscribe_filters=frozenset({"$dps/registrations/res/#"}),
    )


def device_namespace(device_id: str) -> str:
    return f"{DEVICE_PREFIX}{device_id}/"


def registration_namespace(registration_id: str) -> str:
    return f"{REGISTRATION_PREFIX}{registration_id}/"


def split_device_username(username: str) -> tuple[str, str, dict[str, str]]:
    """``<hub>/<device id>/?<query>`` -> (hub, device id, query); a module identity is refused."""
    head, separator, query = username.partition("/?")
    parts = head.split("/")
    if not separator or len(parts) != 2 or not all(parts):
        raise Refused(CONNACK_REFUSED_NOT_AUTHORIZED, "user name is not <hub>/<device id>/?...")
    return parts[0], parts[1], {k: v[-1] for k, v in parse_qs(query).items()}


def is_registration_username(username: str | None) -> bool:
    return username is not None and "/registrations/" in username


def authenticate_device(
    connect: Connect,
    hub_names: set[str],
    lookup: Callable[[str], DeviceCredentials | None],
    peer: PeerCertificate | None,
    now: float,
) -> Principal:
    """The device this CONNECT proves to be, or Refused (CONNACK 5, "not authorized")."""
    if connect.username is None:
        raise Refused(CONNACK_REFUSED_NOT_AUTHORIZED, "no user name")
    hub, device_id, query = split_device_username(connect.username)
    if device_id != connect.client_id:
        raise Refused(CONNACK_REFUSED_NOT_AUTHORIZED, "user name names another device")
    if hub.lower() not in {name.lower() for name in hub_names}:
        raise Refused(CONNACK_REFUSED_NOT_AUTHORIZED, "user name names another hub")
    device = lookup(device_id)
    if device is None:
        raise Refused(CONNACK_REFUSED_NOT_AUTHORIZED, "unknown device")
    if not device.enabled:
        raise Refused(CONNACK_REFUSED_NOT_AUTHORIZED, "device is disabled")
    model_id = query.get("model-id")
    if connect.password:
        token = _token(connect.password)
        if token.policy is not None:
            raise Refused(CONNACK_REFUSED_NOT_AUTHORIZED, "a device SAS has no key name")
        resources = {f"{name}/devices/{device_id}" for name in hub_names}
        _check(token, resources, device.keys, now)
        return device_principal(device_id, model_id, float(token.expiry))
    if peer is not None and peer.matches(device.thumbprints):
        return device_principal(device_id, model_id)
    if peer is not None:
        raise Refused(CONNACK_REFUSED_NOT_AUTHORIZED, "certificate thumbprint is not the device's")
    raise Refused(CONNACK_REFUSED_NOT_AUTHORIZED, "no SAS and no client certificate")


def authenticate_registration(
    connect: Connect,
    *,
    id_scope: str,
    individual: Callable[[str], EnrollmentCredentials | None],
    groups: Callable[[], list[EnrollmentCredentials]],
    peer: PeerCertificate | None,
    now: float,
) -> Principal:
    """The registration this CONNECT may make on DPS, or Refused."""
    username = connect.username or ""
    parts = username.split("/", 3)
    if len(parts) < 3 or parts[1] != "registrations":
        raise Refused(CONNACK_REFUSED_NOT_AUTHORIZED, "user name is not <scope>/registrations/..")
    scope, registration_id = parts[0], parts[2]
    if registration_id != connect.client_id:
        raise Refused(CONNACK_REFUSED_NOT_AUTHORIZED, "user name names another registration")
    if scope != id_scope:
        raise Refused(CONNACK_REFUSED_NOT_AUTHORIZED, "unknown ID scope")
    resource = f"{scope}/registrations/{registration_id}"
    enrollment = individual(registration_id)
    candidates = [enrollment] if enrollment is not None else groups()
    if connect.password:
        token = _token(connect.password)
        for candidate in candidates:
            keys = candidate.keys
            if candidate.group:
                keys = tuple(derive_device_key(key, registration_id) for key in keys)
            try:
                _check(token, {resource}, keys, now)
            except Refused:
                continue
            _usable(candidate)
            return registration_principal(registration_id, candidate.key, float(token.expiry))
        raise Refused(CONNACK_REFUSED_NOT_AUTHORIZED, "SAS matches no enrollment")
    if peer is not None:
        for candidate in candidates:
            if peer.matches(candidate.thumbprints):
                _usable(candidate)
                return registration_principal(registration_id, candidate.key)
        raise Refused(CONNACK_REFUSED_NOT_AUTHORIZED, "certificate matches no enrollment")
    raise Refused(CONNACK_REFUSED_NOT_AUTHORIZED, "no SAS and no client certificate")


def derive_device_key(group_key_b64: str, registration_id: str) -> str:
    """A group enrollment's key for one device: HMAC-SHA256(group key, registration id)."""
    digest = hmac.new(
        base64.b64decode(group_key_b64), registration_id.encode(), hashlib.sha256
    ).digest()
    return base64.b64encode(digest).decode()


def _usable(enrollment: EnrollmentCredentials) -> None:
    if not enrollment.enabled:
        raise Refused(CONNACK_REFUSED_NOT_AUTHORIZED, "enrollment is disabled")


def _token(password: bytes) -> SasToken:
    try:
        return parse_sas(password.decode())
    except (InvalidSignature, UnicodeDecodeError):
        raise Refused(CONNACK_REFUSED_NOT_AUTHORIZED, "password is not a SAS") from None


def _check(token: SasToken, resources: set[str], keys: Sequence[str], now: float) -> None:
    try:
        check_sas(token, resources, [base64.b64decode(key) for key in keys if key], now)
    except InvalidSignature as exc:
        raise Refused(CONNACK_REFUSED_NOT_AUTHORIZED, str(exc)) from None


@dataclass(frozen=True)
class SubscribePlan:
    """What to forward of a client's SUBSCRIBE, and how to answer the filters it may not have."""

    forwarded: list[tuple[str, int]]
    refused_at: list[int]  # positions in the client's list that get 0x80
    accepted: list[str]  # the client's names of the forwarded filters, in the same order

    def granted(self, codes: list[int]) -> list[str]:
        """The client's filters the broker granted (its SUBACK codes for ``forwarded``)."""
        return [
            name for name, code in zip(self.accepted, codes, strict=False) if code != SUBACK_FAILURE
        ]

    def merge(self, granted: list[int]) -> list[int]:
        """The client's SUBACK codes: the broker's for forwarded filters, 0x80 for the rest."""
        codes = iter(granted)
        return [
            SUBACK_FAILURE if index in self.refused_at else next(codes, SUBACK_FAILURE)
            for index in range(len(self.forwarded) + len(self.refused_at))
        ]


def plan_subscribe(principal: Principal, filters: list[tuple[str, int]]) -> SubscribePlan:
    forwarded: list[tuple[str, int]] = []
    refused: list[int] = []
    accepted: list[str] = []
    for index, (topic_filter, qos) in enumerate(filters):
        mapped = principal.subscription(topic_filter, qos)
        if mapped is None:
            refused.append(index)
        else:
            forwarded.append(mapped)
            accepted.append(topic_filter)
    return SubscribePlan(forwarded, refused, accepted)
