"""Build the azure-iot-device client from settings: connection string, X.509 or DPS.

The PnP model ID goes in ``product_info`` (the SDK sends a ``dtmi:`` product_info as the MQTT
``model-id``) and in the DPS registration payload, so the hub and DPS both know what we are.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tunnel_agent.aio import in_daemon_thread
from tunnel_agent.config.proxy import ProxyAddress
from tunnel_agent.config.settings import HubSettings
from tunnel_agent.hub.sdk import (
    X509,
    IoTHubDeviceClient,
    ProvisioningDeviceClient,
    ProxyOptions,
    mqtt_only,
)
from tunnel_agent.tunnel.contract import MODEL_ID

DPS_ASSIGNED = "assigned"
T = TypeVar("T")


class ProvisioningFailed(Exception):
    """DPS did not assign the device to a hub; the message carries DPS's status only."""


@dataclass(frozen=True)
class DeviceIdentity:
    """Where the client connects, for log lines (no secrets)."""

    hostname: str
    device_id: str
    auth: str


def sdk_proxy_options(proxy: ProxyAddress | None) -> ProxyOptions | None:
    if proxy is None:
        return None
    return ProxyOptions(  # type: ignore[no-untyped-call]
        proxy.sdk_proxy_type, proxy.host, proxy.port, proxy.username, proxy.password
    )


def _common_options(settings: HubSettings, proxy: ProxyAddress | None) -> dict[str, Any]:
    options: dict[str, Any] = {
        "websockets": settings.websockets,
        "keep_alive": settings.keep_alive,
        "proxy_options": sdk_proxy_options(proxy),
    }
    if settings.ca_file is not None:
        options["server_verification_cert"] = trust_bundle(settings.ca_file)
    return options


def trust_bundle(extra_ca_file: Path) -> str:
    """The system's trusted CAs plus ``extra_ca_file``, as PEM text.

    The SDK verifies the hub against ``server_verification_cert`` *instead of* the system store;
    ``hub.ca_file`` is extra trust (as ``tunnel.ca_file`` is), so the system's CAs go in too.
    """
    system = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    pems = [ssl.DER_cert_to_PEM_cert(der) for der in system.get_ca_certs(binary_form=True)]
    return "".join(pems) + extra_ca_file.read_text()


def _client_options(settings: HubSettings, proxy: ProxyAddress | None) -> dict[str, Any]:
    return {
        **_common_options(settings, proxy),
        "product_info": MODEL_ID,
        "connection_retry": True,
        "connection_retry_interval": settings.retry_interval,
    }


def _x509(settings: HubSettings) -> X509:
    passphrase = settings.key_passphrase.get_secret_value() if settings.key_passphrase else None
    return X509(str(settings.cert_file), str(settings.key_file), passphrase)  # type: ignore[no-untyped-call]


async def create_device_client(
    settings: HubSettings, proxy: ProxyAddress | None
) -> tuple[IoTHubDeviceClient, DeviceIdentity]:
    """A client ready to connect; DPS registration (network I/O) happens here when configured.

    The SDK's factories wait on its one pipeline thread, which an earlier client's hung
    handshake can hold: they run off the event loop so the caller's deadline still works.
    """
    options = _client_options(settings, proxy)
    if settings.connection_string is not None:
        text = settings.connection_string.get_secret_value()
        fields = dict(part.split("=", 1) for part in text.split(";") if "=" in part)
        client = await _off_loop(
            lambda: IoTHubDeviceClient.create_from_connection_string(text, **options)
        )
        return client, DeviceIdentity(fields["HostName"], fields["DeviceId"], "sas")
    if settings.id_scope is not None:
        hostname, device_id = await provision(settings, proxy)
        key = settings.symmetric_key
        if key is not None:
            client = await _off_loop(
                lambda: IoTHubDeviceClient.create_from_symmetric_key(
                    key.get_secret_value(), hostname, device_id, **options
                )
            )
            return client, DeviceIdentity(hostname, device_id, "dps-sas")
        client = await _off_loop(
            lambda: IoTHubDeviceClient.create_from_x509_certificate(
                _x509(settings), hostname, device_id, **options
            )
        )
        return client, DeviceIdentity(hostname, device_id, "dps-x509")
    x509_host, x509_device = settings.hostname, settings.device_id
    assert x509_host is not None and x509_device is not None
    client = await _off_loop(
        lambda: IoTHubDeviceClient.create_from_x509_certificate(
            _x509(settings), x509_host, x509_device, **options
        )
    )
    return client, DeviceIdentity(x509_host, x509_device, "x509")


async def _off_loop(work: Callable[[], T]) -> T:
    return await in_daemon_thread(lambda: mqtt_only(work), "hub-client-setup")


async def provision(settings: HubSettings, proxy: ProxyAddress | None) -> tuple[str, str]:
    """Register with DPS, sending the model ID, and return (assigned hub, device id)."""
    assert settings.id_scope is not None and settings.registration_id is not None
    options = {
        **_common_options(settings, proxy),
        "provisioning_host": settings.provisioning_host,
        "registration_id": settings.registration_id,
        "id_scope": settings.id_scope,
    }
    key = settings.symmetric_key
    if key is not None:
        dps = await _off_loop(
            lambda: ProvisioningDeviceClient.create_from_symmetric_key(
                symmetric_key=key.get_secret_value(), **options
            )
        )
    else:
        dps = await _off_loop(
            lambda: ProvisioningDeviceClient.create_from_x509_certificate(
                x509=_x509(settings), **options
            )
        )
    dps.provisioning_payload = {"modelId": MODEL_ID}
    async with asyncio.timeout(settings.operation_timeout):
        result = await dps.register()
    state = result.registration_state
    if result.status != DPS_ASSIGNED or state is None or not state.assigned_hub:
        raise ProvisioningFailed(f"DPS registration status: {result.status}")
    return str(state.assigned_hub), str(state.device_id)
