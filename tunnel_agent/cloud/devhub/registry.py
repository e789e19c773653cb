"""The emulator's identity registry: devices, DPS enrollments and the service key, in one file.

Devices are kept in IoT Hub's own JSON shape (``deviceId``, ``etag``, ``status``,
``authentication``...), so the REST API returns them as stored. ``tunnel-agent devhub add-device``
and a running devhub both change the file: every change is a read-modify-write under an exclusive
``flock``, and readers reload when the file changed, so neither loses the other's work.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import json
import os
import re
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tunnel_agent.cloud.devhub.access import DeviceCredentials, EnrollmentCredentials

REGISTRY_FILE = "devices.json"
LOCK_FILE = "devices.lock"
SERVICE_POLICY = "service"
NEVER = "0001-01-01T00:00:00Z"
AUTH_TYPES = ("sas", "selfSigned", "certificateAuthority", "none")
_DEVICE_ID = re.compile(r"^[A-Za-z0-9\-.%_*?!(),:=@$']{1,128}$")
KEY_BYTES = (16, 64)


class RegistryError(Exception):
    """A request the registry refuses; ``code`` is IoT Hub's error code name."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def not_found(device_id: str) -> RegistryError:
    return RegistryError(404, "DeviceNotFound", f"Device {device_id[:128]} not registered")


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def check_device_id(device_id: str) -> None:
    if not _DEVICE_ID.match(device_id):
        raise RegistryError(
            400,
            "ArgumentInvalid",
            "device id: 1-128 letters, digits and - . % _ * ? ! ( ) , : = @ $ '",
        )


def _check_key(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise RegistryError(400, "ArgumentInvalid", f"{name} must be a base64 string")
    try:
        size = len(base64.b64decode(value, validate=True))
    except (binascii.Error, ValueError):
        raise RegistryError(400, "ArgumentInvalid", f"{name} is not base64") from None
    if not KEY_BYTES[0] <= size <= KEY_BYTES[1]:
        raise RegistryError(400, "ArgumentInvalid", f"{name} must be 16 to 64 bytes")
    return value


def _etag(version: int) -> str:
    return base64.b64encode(str(version).encode()).decode()


def etag_matches(if_match: str | None, etag: str) -> bool:
    """``If-Match`` absent or ``*`` matches anything; quotes and ``W/`` are not part of the tag."""
    if if_match is None:
        return True
    wanted = if_match.strip().removeprefix("W/").strip('"')
    return wanted in ("*", etag)


@dataclass(frozen=True)
class Snapshot:
    service_key: str
    id_scope: str
    devices: dict[str, dict[str, Any]]
    enrollments: dict[str, dict[str, Any]]


def credentials(device: dict[str, Any]) -> DeviceCredentials:
    auth = device.get("authentication") or {}
    keys = auth.get("symmetricKey") or {}
    prints = auth.get("x509Thumbprint") or {}
    return DeviceCredentials(
        device["deviceId"],
        device.get("status") == "enabled",
        tuple(k for k in (keys.get("primaryKey"), keys.get("secondaryKey")) if k),
        tuple(t for t in (prints.get("primaryThumbprint"), prints.get("secondaryThumbprint")) if t),
    )


def enrollment_credentials(enrollment: dict[str, Any]) -> EnrollmentCredentials:
    return EnrollmentCredentials(
        enrollment["name"],
        bool(enrollment.get("group")),
        enrollment.get("provisioningStatus", "enabled") == "enabled",
        tuple(k for k in (enrollment.get("primaryKey"), enrollment.get("secondaryKey")) if k),
        tuple(t for t in (enrollment.get("thumbprint"),) if t),
    )


class DeviceRegistry:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.file = folder / REGISTRY_FILE
        self._seen: tuple[int, int, int] | None = None
        self._snapshot: Snapshot | None = None

    # -- reading -------------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """The registry as it is on disk now (re-read only when the file changed)."""
        try:
            stat = self.file.stat()
        except FileNotFoundError:
            with self._locked():
                pass
            stat = self.file.stat()
        seen = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if self._snapshot is None or seen != self._seen:
            document = json.loads(self.file.read_text())
            if "id_scope" not in document:  # written by an earlier version: upgrade it once
                with self._changing():
                    pass
                return self.snapshot()
            self._snapshot = self._parse(document)
            self._seen = seen
        return self._snapshot

    @property
    def service_key(self) -> str:
        return self.snapshot().service_key

    @property
    def id_scope(self) -> str:
        """The DPS ID scope devices of this emulator use, made once per state folder."""
        return self.snapshot().id_scope

    def get(self, device_id: str) -> dict[str, Any] | None:
        return self.snapshot().devices.get(device_id)

    def devices(self) -> dict[str, dict[str, Any]]:
        return self.snapshot().devices

    def device_credentials(self, device_id: str) -> DeviceCredentials | None:
        device = self.get(device_id)
        return credentials(device) if device is not None else None

    def individual_enrollment(self, registration_id: str) -> EnrollmentCredentials | None:
        enrollment = self.snapshot().enrollments.get(f"individual/{registration_id}")
        return enrollment_credentials(enrollment) if enrollment is not None else None

    def group_enrollments(self) -> list[EnrollmentCredentials]:
        return [
            enrollment_credentials(e)
            for e in self.snapshot().enrollments.values()
            if e.get("group")
        ]

    def enrollment(self, key: str) -> dict[str, Any] | None:
        """``individual/<registration id>`` or ``group/<name>``."""
        return self.snapshot().enrollments.get(key)

    # -- writing -------------------------------------------------------------------------------

    def add(self, device_id: str, thumbprint: str | None = None) -> dict[str, Any]:
        """The device, created with fresh keys (or a certificate thumbprint) if it is new."""
        check_device_id(device_id)
        with self._changing() as document:
            existing = document["devices"].get(device_id)
            if existing is not None:
                return dict(existing)
            if thumbprint:
                auth: dict[str, Any] = {
                    "type": "selfSigned",
                    "x509Thumbprint": {
                        "primaryThumbprint": thumbprint,
                        "secondaryThumbprint": None,
                    },
                }
            else:
                auth = {"type": "sas"}
            device = _new_device(device_id, {"authentication": auth})
            document["devices"][device_id] = device
            return dict(device)

    def put(self, device_id: str, body: dict[str, Any], if_match: str | None) -> dict[str, Any]:
        """IoT Hub's ``PUT /devices/{id}``: create (no If-Match) or update (If-Match)."""
        check_device_id(device_id)
        if body.get("deviceId", device_id) != device_id:
            raise RegistryError(400, "ArgumentInvalid", "deviceId differs from the URL")
        with self._changing() as document:
            existing = document["devices"].get(device_id)
            if existing is None:
                if if_match is not None and not etag_matches(if_match, "*"):
                    raise not_found(device_id)
                device = _new_device(device_id, body)
            elif if_match is None:
                raise RegistryError(
                    409,
                    "DeviceAlreadyExists",
                    f"A device with ID '{device_id[:128]}' is already registered.",
                )
            elif not etag_matches(if_match, existing["etag"]):
                raise RegistryError(412, "PreconditionFailed", "Precondition failed: etag")
            else:
                device = _updated_device(existing, body)
            document["devices"][device_id] = device
            return dict(device)

    def delete(self, device_id: str, if_match: str | None) -> None:
        with self._changing() as document:
            existing = document["devices"].get(device_id)
            if existing is None:
                raise not_found(device_id)
            if not etag_matches(if_match, existing["etag"]):
                raise RegistryError(412, "PreconditionFailed", "Precondition failed: etag")
            del document["devices"][device_id]

    def add_enrollment(
        self,
        name: str,
        *,
        group: bool,
        device_id: str | None = None,
        primary_key: str | None = None,
        thumbprint: str | None = None,
    ) -> dict[str, Any]:
        """A DPS enrollment (replaced if it exists): symmetric key unless a thumbprint is given."""
        if not name or "/" in name or len(name) > 128:
            raise RegistryError(400, "ArgumentInvalid", "enrollment name: 1-128 chars, no '/'")
        if device_id is not None:
            check_device_id(device_id)
        enrollment: dict[str, Any] = {
            "name": name,
            "group": group,
            "deviceId": device_id,
            "provisioningStatus": "enabled",
            "attestation": "x509" if thumbprint else "symmetricKey",
        }
        if thumbprint:
            enrollment["thumbprint"] = thumbprint.replace(":", "").upper()
        else:
            enrollment["primaryKey"] = _check_key("primaryKey", primary_key or new_key())
            enrollment["secondaryKey"] = new_key()
        with self._changing() as document:
            document["enrollments"][f"{'group' if group else 'individual'}/{name}"] = enrollment
        return enrollment

    # -- the file ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if self.file.exists():
                document = _upgrade(json.loads(self.file.read_text()))
            else:
                document = _upgrade({"service_key": new_key(), "devices": {}})
                self._save(document)
            yield document
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _changing(self) -> Iterator[dict[str, Any]]:
        with self._locked() as document:
            yield document
            self._save(document)

    def _save(self, document: dict[str, Any]) -> None:
        temporary = self.file.with_suffix(".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(document, handle, indent=1)
        temporary.replace(self.file)

    @staticmethod
    def _parse(document: dict[str, Any]) -> Snapshot:
        document = _upgrade(document)
        return Snapshot(
            str(document["service_key"]),
            str(document["id_scope"]),
            document["devices"],
            document["enrollments"],
        )


def _upgrade(document: dict[str, Any]) -> dict[str, Any]:
    """Registries from earlier versions listed ``{device_id, key, address}``: keep the keys."""
    devices = document.get("devices", {})
    if isinstance(devices, list):
        document["devices"] = {
            d["device_id"]: _new_device(
                d["device_id"],
                {"authentication": {"type": "sas", "symmetricKey": {"primaryKey": d["key"]}}},
            )
            for d in devices
        }
        document.pop("address_block", None)
    document.setdefault("enrollments", {})
    document.setdefault("id_scope", f"0ne{secrets.token_hex(4).upper()}")
    return document


def _authentication(body: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
    auth = body.get("authentication") or previous or {"type": "sas"}
    if not isinstance(auth, dict):
        raise RegistryError(400, "ArgumentInvalid", "authentication must be an object")
    kind = auth.get("type") or "sas"
    if kind not in AUTH_TYPES:
        raise RegistryError(400, "ArgumentInvalid", f"authentication.type must be {AUTH_TYPES}")
    keys = auth.get("symmetricKey") or {}
    prints = auth.get("x509Thumbprint") or {}
    result: dict[str, Any] = {
        "type": kind,
        "symmetricKey": {"primaryKey": None, "secondaryKey": None},
        "x509Thumbprint": {"primaryThumbprint": None, "secondaryThumbprint": None},
    }
    if kind == "sas":
        result["symmetricKey"] = {
            "primaryKey": _check_key("primaryKey", keys.get("primaryKey") or new_key()),
            "secondaryKey": _check_key("secondaryKey", keys.get("secondaryKey") or new_key()),
        }
    elif kind == "selfSigned":
        primary = prints.get("primaryThumbprint")
        if not isinstance(primary, str) or not re.fullmatch(r"[0-9A-Fa-f:]{40,95}", primary):
            raise RegistryError(400, "ArgumentInvalid", "primaryThumbprint is required (hex)")
        secondary = prints.get("secondaryThumbprint")
        result["x509Thumbprint"] = {
            "primaryThumbprint": primary.replace(":", "").upper(),
            "secondaryThumbprint": secondary.replace(":", "").upper()
            if isinstance(secondary, str) and secondary
            else None,
        }
    return result


def _status(body: dict[str, Any], previous: str | None) -> str:
    status = body.get("status") or previous or "enabled"
    if status not in ("enabled", "disabled"):
        raise RegistryError(400, "ArgumentInvalid", "status must be enabled or disabled")
    return str(status)


def _new_device(device_id: str, body: dict[str, Any]) -> dict[str, Any]:
    stamp = now_iso()
    capabilities = body.get("capabilities") or {}
    return {
        "deviceId": device_id,
        "generationId": uuid.uuid4().hex[:18],
        "etag": _etag(1),
        "version": 1,
        "status": _status(body, None),
        "statusReason": body.get("statusReason"),
        "statusUpdatedTime": stamp,
        "authentication": _authentication(body, None),
        "capabilities": {"iotEdge": bool(capabilities.get("iotEdge", False))},
        "cloudToDeviceMessageCount": 0,
    }


def _updated_device(existing: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    device = dict(existing)
    status = _status(body, existing["status"])
    if status != existing["status"]:
        device["statusUpdatedTime"] = now_iso()
    device["status"] = status
    device["statusReason"] = body.get("statusReason", existing.get("statusReason"))
    device["authentication"] = _authentication(body, existing.get("authentication"))
    if "capabilities" in body and isinstance(body["capabilities"], dict):
        device["capabilities"] = {"iotEdge": bool(body["capabilities"].get("iotEdge", False))}
    device["version"] = int(existing.get("version", 1)) + 1
    device["etag"] = _etag(device["version"])
    return device
