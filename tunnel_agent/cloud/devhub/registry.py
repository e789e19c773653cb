"""The emulator's device registry: a JSON file in the state folder.

Each device gets a symmetric key and its own loopback address (its broker listens there on 8883);
the hub gets a service policy key. ``add-device`` writes here; a running devhub notices the change.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

REGISTRY_FILE = "devices.json"
SERVICE_POLICY = "service"
DEFAULT_ADDRESS_BLOCK = "127.77.0.0/24"
_DEVICE_ID = re.compile(r"^[A-Za-z0-9\-.%_*?!(),:=@$']{1,128}$")


class RegistryError(Exception):
    pass


@dataclass(frozen=True)
class Device:
    device_id: str
    key: str
    address: str

    def connection_string(self) -> str:
        return f"HostName={self.address};DeviceId={self.device_id};SharedAccessKey={self.key}"


def new_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


class DeviceRegistry:
    def __init__(self, folder: Path, address_block: str | None = None) -> None:
        """The address block is chosen when the registry is created; later it must match."""
        self.folder = folder
        self.file = folder / REGISTRY_FILE
        stored = str(self._read().get("address_block") or "") if self.file.exists() else None
        if stored and address_block and stored != address_block:
            raise RegistryError(f"{folder} uses address block {stored}, not {address_block}")
        block = stored or address_block or DEFAULT_ADDRESS_BLOCK
        try:
            self.network = ipaddress.ip_network(block)
        except ValueError:
            raise RegistryError(f"{block} is not a network such as 127.77.0.0/24") from None
        if not self.network.is_loopback:
            raise RegistryError(f"{block} is not a loopback network")

    def _read(self) -> dict[str, object]:
        document = json.loads(self.file.read_text())
        return document if isinstance(document, dict) else {}

    def load(self) -> tuple[str, dict[str, Device]]:
        """(service key, devices); creates an empty registry on first use."""
        if not self.file.exists():
            self._save(new_key(), {})
        document = json.loads(self.file.read_text())
        devices = {d["device_id"]: Device(**d) for d in document.get("devices", [])}
        return str(document["service_key"]), devices

    def mtime(self) -> float:
        return self.file.stat().st_mtime if self.file.exists() else 0.0

    def add(self, device_id: str) -> Device:
        if not _DEVICE_ID.match(device_id):
            raise RegistryError(
                "device id: 1-128 letters, digits and - . % _ * ? ! ( ) , : = @ $ '"
            )
        service_key, devices = self.load()
        if device_id in devices:
            return devices[device_id]
        used = {d.address for d in devices.values()}
        hosts = (
            str(h) for h in self.network.hosts() if str(h) not in used and not str(h).endswith(".1")
        )
        address = next(hosts, None)
        if address is None:
            raise RegistryError(f"no free address left in {self.network}")
        device = Device(device_id, new_key(), address)
        devices[device_id] = device
        self._save(service_key, devices)
        return device

    def _save(self, service_key: str, devices: dict[str, Device]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        document = {
            "service_key": service_key,
            "address_block": str(self.network),
            "devices": [asdict(d) for d in devices.values()],
        }
        temporary = self.file.with_suffix(".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(document, handle, indent=2)
        temporary.replace(self.file)
