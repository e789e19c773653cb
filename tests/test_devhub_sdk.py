"""Microsoft's own SDKs against the devhub: ``azure-iot-hub`` (service) and ``azure-iot-device``.

The service SDK's ``IoTHubRegistryManager`` is used exactly as against Azure, from the service
connection string devhub prints; only the local CA is trusted through ``REQUESTS_CA_BUNDLE``.
"""

from __future__ import annotations

import base64
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from azure.iot.device import IoTHubDeviceClient, MethodResponse
from azure.iot.device.common.transport_exceptions import UnauthorizedError
from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.models import CloudToDeviceMethod, QuerySpecification, Twin, TwinProperties
from msrest.exceptions import HttpOperationError

from tests.support.hub import HubHarness
from tests.support.threadloop import ThreadLoop
from tunnel_agent.cloud.devhub.certs import LocalCA

MODEL_ID = "dtmi:com:example:Thermostat;1"


@pytest.fixture(scope="module")
def sdk_hub(
    tmp_path_factory: pytest.TempPathFactory, ca: LocalCA, servers: ThreadLoop
) -> Iterator[HubHarness]:
    harness = HubHarness(tmp_path_factory.mktemp("sdk"), ca, servers, device_id="sdk-unused")
    yield harness
    harness.stop()


@pytest.fixture
def registry(sdk_hub: HubHarness, monkeypatch: pytest.MonkeyPatch) -> IoTHubRegistryManager:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(sdk_hub.ca.cert_file))
    return IoTHubRegistryManager.from_connection_string(sdk_hub.devhub.service_connection_string)


def until(predicate: Any, timeout_s: float, what: str) -> None:
    """Poll a condition from synchronous code (the SDKs here are synchronous)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def device_id(name: str) -> str:
    return f"{name}-{secrets.token_hex(3)}"


def error_of(call: Any, *args: Any) -> tuple[int, str]:
    with pytest.raises(HttpOperationError) as failed:
        call(*args)
    return failed.value.response.status_code, failed.value.response.text


class SdkDevice:
    """An ``azure-iot-device`` client answering methods and following desired properties."""

    def __init__(self, hub: HubHarness, connection_string: str, method_status: int = 200) -> None:
        self.client = IoTHubDeviceClient.create_from_connection_string(
            connection_string,
            server_verification_cert=hub.ca.cert_file.read_text(),
            product_info=MODEL_ID,
            connection_retry=False,
        )
        self.desired: list[dict[str, Any]] = []
        self.calls: list[str] = []
        self.changed = threading.Event()

        def on_method(request: Any) -> None:
            self.calls.append(request.name)
            answer = {"echo": request.payload} if method_status == 200 else {"message": "no"}
            self.client.send_method_response(
                MethodResponse.create_from_method_request(request, method_status, answer)
            )

        def on_desired(patch: dict[str, Any]) -> None:
            self.desired.append(patch)
            self.changed.set()

        self.client.on_method_request_received = on_method
        self.client.on_twin_desired_properties_patch_received = on_desired
        self.client.connect()

    def close(self) -> None:
        self.client.shutdown()


def test_registry_create_get_list_update_delete(registry: IoTHubRegistryManager) -> None:
    name = device_id("crud")
    created = registry.create_device_with_sas(name, None, None, "enabled")
    keys = created.authentication.symmetric_key
    assert len(base64.b64decode(keys.primary_key)) == 32 and keys.secondary_key != keys.primary_key
    assert created.status == "enabled" and created.etag and created.generation_id

    status, text = error_of(registry.create_device_with_sas, name, None, None, "enabled")
    assert status == 409 and "ErrorCode:DeviceAlreadyExists" in text

    fetched = registry.get_device(name)
    assert (fetched.device_id, fetched.etag, fetched.connection_state) == (
        name,
        created.etag,
        "Disconnected",
    )
    assert name in [d.device_id for d in registry.get_devices()]

    status, text = error_of(
        registry.update_device_with_sas,
        name,
        '"stale"',
        keys.primary_key,
        keys.secondary_key,
        "disabled",
    )
    assert status == 412 and "ErrorCode:PreconditionFailed" in text
    new_key = base64.b64encode(secrets.token_bytes(32)).decode()
    updated = registry.update_device_with_sas(
        name, created.etag, new_key, keys.secondary_key, "disabled", status_reason="maintenance"
    )
    assert updated.status == "disabled" and updated.status_reason == "maintenance"
    assert updated.etag != created.etag
    assert updated.authentication.symmetric_key.primary_key == new_key

    registry.delete_device(name)
    status, text = error_of(registry.get_device, name)
    assert status == 404 and "ErrorCode:DeviceNotFound" in text
    status, _ = error_of(registry.delete_device, name)
    assert status == 404


def test_direct_methods_200_400_and_404(
    sdk_hub: HubHarness, registry: IoTHubRegistryManager
) -> None:
    good, refusing, offline = device_id("m-ok"), device_id("m-400"), device_id("m-off")
    for name in (good, refusing, offline):
        registry.create_device_with_sas(name, None, None, "enabled")
    devices = [
        SdkDevice(sdk_hub, sdk_hub.devhub.connection_string(good)),
        SdkDevice(sdk_hub, sdk_hub.devhub.connection_string(refusing), method_status=400),
    ]
    try:
        for name in (good, refusing):
            sdk_hub.wait_device(device_id=name)
        request = CloudToDeviceMethod(
            method_name="ping", payload={"n": 1}, response_timeout_in_seconds=10
        )
        answer = registry.invoke_device_method(good, request)
        assert (answer.status, answer.payload) == (200, {"echo": {"n": 1}})
        answer = registry.invoke_device_method(refusing, request)
        assert (answer.status, answer.payload) == (400, {"message": "no"})

        status, text = error_of(registry.invoke_device_method, offline, request)
        assert status == 404 and "404103" in text  # registered, not connected
        status, text = error_of(registry.invoke_device_method, device_id("nobody"), request)
        assert status == 404 and "404001" in text
        too_short = CloudToDeviceMethod(method_name="ping", response_timeout_in_seconds=1)
        status, _ = error_of(registry.invoke_device_method, good, too_short)
        assert status == 400
        assert devices[0].calls == ["ping"]  # the refused call never reached the device
        assert registry.get_device(good).connection_state == "Connected"
    finally:
        for device in devices:
            device.close()


def test_twins_patch_replace_and_query(
    sdk_hub: HubHarness, registry: IoTHubRegistryManager
) -> None:
    name, other = device_id("twin"), device_id("twin-other")
    registry.create_device_with_sas(name, None, None, "enabled")
    registry.create_device_with_sas(other, None, None, "enabled")
    device = SdkDevice(sdk_hub, sdk_hub.devhub.connection_string(name))
    try:
        sdk_hub.wait_device(device_id=name)
        twin = registry.get_twin(name)
        assert twin.connection_state == "Connected"
        assert sdk_hub.device_link(name).twin.model_id == MODEL_ID

        status, text = error_of(
            registry.update_twin,
            name,
            Twin(properties=TwinProperties(desired={"fps": 15})),
            "AAAAAAAAAAA=",
        )
        assert status == 412 and "PreconditionFailed" in text
        patched = registry.update_twin(
            name,
            Twin(tags={"site": "lab"}, properties=TwinProperties(desired={"fps": 15})),
            twin.etag,
        )  # PATCH /twins/{id}
        assert patched.tags == {"site": "lab"} and patched.properties.desired["fps"] == 15
        assert patched.etag != twin.etag
        until(lambda: device.desired, 15, "the desired patch on the device")
        assert device.desired[-1]["fps"] == 15

        device.client.patch_twin_reported_properties({"firmware": "1.2"})
        until(
            lambda: registry.get_twin(name).properties.reported.get("firmware") == "1.2",
            15,
            "the reported property",
        )

        replaced = registry.replace_twin(
            name, Twin(tags={"room": "7"}, properties=TwinProperties(desired={"gain": 2}))
        )  # PUT /twins/{id}
        assert replaced.tags == {"room": "7"}
        assert "fps" not in replaced.properties.desired and replaced.properties.desired["gain"] == 2
        until(lambda: device.desired[-1].get("gain") == 2, 15, "the replaced desired properties")
        assert device.desired[-1]["fps"] is None  # removed properties reach the device as null

        everyone = registry.query_iot_hub(QuerySpecification(query="SELECT * FROM devices"))
        assert {name, other} <= {t.device_id for t in everyone.items}
        by_id = registry.query_iot_hub(
            QuerySpecification(query=f"SELECT * FROM devices WHERE deviceId = '{other}'")
        )
        assert [t.device_id for t in by_id.items] == [other]
        by_report = registry.query_iot_hub(
            QuerySpecification(
                query="SELECT * FROM devices WHERE properties.reported.firmware = '1.2'"
            )
        )
        assert [t.device_id for t in by_report.items] == [name]
    finally:
        device.close()


def test_disabling_a_connected_device_disconnects_it(
    sdk_hub: HubHarness, registry: IoTHubRegistryManager
) -> None:
    name = device_id("disable")
    created = registry.create_device_with_sas(name, None, None, "enabled")
    connection_string = sdk_hub.devhub.connection_string(name)
    device = SdkDevice(sdk_hub, connection_string)
    try:
        sdk_hub.wait_device(device_id=name)
        keys = created.authentication.symmetric_key
        registry.update_device_with_sas(
            name, created.etag, keys.primary_key, keys.secondary_key, "disabled"
        )
        sdk_hub.wait_device_gone(device_id=name)
        until(lambda: not device.client.connected, 15, "the SDK to see the disconnect")
        assert registry.get_device(name).connection_state == "Disconnected"
    finally:
        device.close()
    with pytest.raises(UnauthorizedError, match="not authorised"):
        SdkDevice(sdk_hub, connection_string)  # refused while disabled (CONNACK 5)
    assert registry.get_twin(name).connection_state == "Disconnected"
    started = time.monotonic()
    registry.delete_device(name)
    assert time.monotonic() - started < 10
