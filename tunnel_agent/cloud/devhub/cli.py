"""``tunnel-agent devhub`` and its commands: add-device, connection-string, add-enrollment."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from tunnel_agent.cloud.devhub.broker import BrokerError
from tunnel_agent.cloud.devhub.certs import LocalCA
from tunnel_agent.cloud.devhub.hub import DevHub, HubAddresses, device_connection_string
from tunnel_agent.cloud.devhub.registry import DeviceRegistry, RegistryError
from tunnel_agent.logs import configure_logging

DEFAULT_HOSTNAME = "127.0.0.1"


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "tunnel-agent" / "devhub"


@dataclass(frozen=True)
class HubOptions:
    rest: str
    mqtt_port: int
    websocket_port: int | None
    dps: str | None


def _hostname(state: Path) -> str:
    """The host name devices use: the one the last devhub on this state folder listened on."""
    addresses = HubAddresses.load(state)
    return addresses.hostname if addresses is not None else DEFAULT_HOSTNAME


def _fail(exc: Exception, code: int = 2) -> int:
    print(f"tunnel-agent devhub: {exc}", file=sys.stderr)
    return code


def certificate_thumbprint(cert_file: Path) -> str:
    """SHA-1 thumbprint (upper-case hex) of the first certificate in a PEM file."""
    text = cert_file.read_text()
    begin = text.index("-----BEGIN CERTIFICATE-----")
    end = text.index("-----END CERTIFICATE-----", begin) + len("-----END CERTIFICATE-----")
    der = ssl.PEM_cert_to_DER_cert(text[begin:end])
    return hashlib.sha1(der, usedforsecurity=False).hexdigest().upper()


def _issue_certificate(state: Path, name: str, out: TextIO) -> str:
    """A client certificate for ``name`` (CN) from the devhub CA; its thumbprint."""
    pair = LocalCA(state / "ca").issue(f"client-{name.encode().hex()}", [name])
    out.write(f"certificate: {pair.cert_file}\nkey:         {pair.key_file}\n")
    return certificate_thumbprint(pair.cert_file)


def add_device(state: Path, device_id: str, x509: bool, out: TextIO) -> int:
    try:
        registry = DeviceRegistry(state)
        existing = registry.get(device_id)
        thumbprint = _issue_certificate(state, device_id, out) if x509 and not existing else None
        device = registry.add(device_id, thumbprint)
    except (RegistryError, OSError, ValueError) as exc:
        return _fail(exc)
    out.write(device_connection_string(_hostname(state), device) + "\n")
    return 0


def connection_string(state: Path, device_id: str, out: TextIO) -> int:
    device = DeviceRegistry(state).get(device_id)
    if device is None:
        return _fail(RegistryError(404, "DeviceNotFound", f"no device {device_id!r} in {state}"))
    out.write(device_connection_string(_hostname(state), device) + "\n")
    return 0


def add_enrollment(
    state: Path,
    name: str,
    *,
    group: bool,
    device_id: str | None,
    key: str | None,
    x509: bool,
    cert_file: Path | None,
    out: TextIO,
) -> int:
    try:
        registry = DeviceRegistry(state)
        thumbprint = None
        if cert_file is not None:
            thumbprint = certificate_thumbprint(cert_file)
        elif x509:
            thumbprint = _issue_certificate(state, name, out)
        enrollment = registry.add_enrollment(
            name, group=group, device_id=device_id, primary_key=key, thumbprint=thumbprint
        )
    except (RegistryError, OSError, ValueError) as exc:
        return _fail(exc)
    addresses = HubAddresses.load(state)
    out.write(
        f"id scope:       {registry.id_scope}\n"
        f"enrollment:     {'group' if group else 'individual'} {name}\n"
        f"DPS endpoint:   {addresses.dps if addresses and addresses.dps else 'start with --dps'}\n"
    )
    if thumbprint:
        out.write(f"thumbprint:     {thumbprint}\n")
    else:
        out.write(f"symmetric key:  {enrollment['primaryKey']}\n")
        if group:
            out.write("  (a device's key is HMAC-SHA256(group key, registration id), base64)\n")
    return 0


def run_devhub(state: Path, options: HubOptions, out: TextIO) -> int:
    configure_logging("INFO")

    async def main() -> None:
        hub = DevHub(
            state,
            options.rest,
            options.mqtt_port,
            websocket_port=options.websocket_port,
            dps_listen=options.dps,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await hub.start()
        try:
            addresses = hub.addresses
            lines = [
                f"IoT Hub emulator running (state: {state})",
                f"  service connection string: {hub.service_connection_string}",
                f"  REST API:                  {hub.rest_url}",
                f"  device MQTT (TLS):         {addresses.mqtt}",
            ]
            if addresses.websockets:
                lines.append(
                    f"  MQTT over WebSockets:      wss://{addresses.websockets}/$iothub/websocket"
                )
            if addresses.dps:
                scope = hub.registry.id_scope
                lines.append(f"  DPS (MQTT, TLS):           {addresses.dps}, ID scope {scope}")
            lines += [
                f"  CA certificate:            {hub.ca.cert_file}",
                f"  devices:                   {', '.join(hub.devices) or 'none yet'}",
                f"  add one with:              tunnel-agent devhub add-device NAME --state {state}",
            ]
            out.write("\n".join(lines) + "\n")
            out.flush()
            await stop.wait()
        finally:
            await hub.stop()

    try:
        asyncio.run(main())
    except (BrokerError, OSError, RegistryError, TimeoutError) as exc:
        return _fail(exc, 1)
    return 0
