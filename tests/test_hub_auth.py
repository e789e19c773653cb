"""Other ways onto the hub: X.509 device certificates, DPS provisioning, and the PnP model ID."""

from __future__ import annotations

import base64
import secrets
from pathlib import Path

from tests.support.agent import AgentRunner
from tests.support.hub import HubHarness
from tests.support.net import fresh_loopback_ip
from tests.support.threadloop import ThreadLoop
from tunnel_agent.cloud.devhub.broker import BrokerSpec, MosquittoBroker
from tunnel_agent.cloud.devhub.certs import LocalCA
from tunnel_agent.cloud.devhub.dps import DpsEmulator, Enrollment
from tunnel_agent.tunnel.contract import MODEL_ID

ENCODED_MODEL_ID = "model-id=dtmi%3Aazure%3Avideoanalyzer%3AWebSocketTunneling%3B1"


async def assert_method_round_trip(hub: HubHarness) -> None:
    status, body = await hub.tunnel_open("wss://relay.example.net/t", "token", 9)
    assert (status, body["target"]) == (400, "localhost:9")


async def test_connection_string_sends_the_pnp_model_id(tmp_path: Path, hub: HubHarness) -> None:
    agent = AgentRunner(tmp_path, {"hub": hub.hub_config(), "cameras": []})
    try:
        agent.wait_connected()
        hub.wait_device()
        await assert_method_round_trip(hub)
        assert ENCODED_MODEL_ID in hub.broker.log_file.read_text()
    finally:
        agent.stop()
        hub.wait_device_gone()


async def test_x509_device_certificate(tmp_path: Path, ca: LocalCA, servers: ThreadLoop) -> None:
    hub = HubHarness(tmp_path, ca, servers, device_id="x509-cam", require_client_cert=True)
    device = ca.issue("device-x509-cam", ["x509-cam"])
    agent = AgentRunner(
        tmp_path / "agent",
        {
            "hub": {
                "hostname": hub.host,
                "device_id": "x509-cam",
                "cert_file": str(device.cert_file),
                "key_file": str(device.key_file),
                "ca_file": str(ca.cert_file),
            },
            "cameras": [],
        },
    )
    without_cert = AgentRunner(tmp_path / "no-cert", {"hub": hub.hub_config(), "cameras": []})
    try:
        agent.wait_connected()
        hub.wait_device()
        await assert_method_round_trip(hub)
        assert ENCODED_MODEL_ID in hub.broker.log_file.read_text()
        without_cert.wait_event("hub.connect_failed")
        assert not without_cert.events("hub.connected")
    finally:
        without_cert.stop()
        agent.stop()
        hub.stop()


async def test_dps_provisioning_sends_the_model_id_and_reaches_the_assigned_hub(
    tmp_path: Path, ca: LocalCA, servers: ThreadLoop
) -> None:
    hub = HubHarness(tmp_path, ca, servers, device_id="dps-cam")
    dps_host = fresh_loopback_ip()
    pair = ca.issue(f"dps-{dps_host}", [dps_host])
    broker = MosquittoBroker(
        BrokerSpec(dps_host, tmp_path / "dps", ca.cert_file, pair.cert_file, pair.key_file)
    )
    servers.run(broker.start())
    dps = DpsEmulator(dps_host, 8883, ca.cert_file, {"gw-dps": Enrollment(hub.host, "dps-cam")})
    servers.spawn(dps.run())
    servers.run(dps.wait_ready(10))
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    agent = AgentRunner(
        tmp_path / "agent",
        {
            "hub": {
                "id_scope": "0ne00TEST01",
                "registration_id": "gw-dps",
                "symmetric_key": key,
                "provisioning_host": dps_host,
                "ca_file": str(ca.cert_file),
            },
            "cameras": [],
        },
    )
    try:
        agent.wait_connected(timeout_s=40)
        hub.wait_device()
        await assert_method_round_trip(hub)
        assert dps.registrations["gw-dps"].payload == {"modelId": MODEL_ID}
        assert agent.events("hub.connected")[0]["device"] == "dps-cam"
        assert key not in agent.output()
    finally:
        agent.stop()
        hub.stop()
        servers.run(broker.stop())
