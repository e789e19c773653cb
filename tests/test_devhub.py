"""``tunnel-agent devhub`` as users run it: one host name for every device, the commands that
print connection strings, DPS enrollments, twins that survive a restart, errors, a clean stop."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import aiomqtt
import psutil
import pytest

from tests.support.agent import AgentRunner
from tests.support.net import free_port, fresh_loopback_ip
from tests.support.processes import ManagedProcess
from tunnel_agent.cloud.devhub import broker as broker_module
from tunnel_agent.cloud.devhub.broker import INSTALL_HINT, BrokerError
from tunnel_agent.cloud.devhub.hub import DevHub
from tunnel_agent.cloud.sas import generate_sas

DEVHUB = [sys.executable, "-m", "tunnel_agent", "devhub"]


def mosquittos_under(folder: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "mosquitto" in (process.info["name"] or "") and str(folder) in cmdline:
            found.append(process)
    return found


def command(*args: str) -> str:
    done = subprocess.run([*DEVHUB, *args], capture_output=True, text=True, timeout=30, check=True)
    return done.stdout


async def invoke(
    http: aiohttp.ClientSession, rest: str, sas: str, device_id: str
) -> dict[str, object]:
    body = {
        "methodName": "tunnelOpen",
        "payload": {
            "remoteEndpoint": "wss://x.example/t",
            "remoteAuthorizationToken": "t",
            "localPort": 554,
        },
        "responseTimeoutInSeconds": 10,
    }
    async with http.post(
        f"https://{rest}/twins/{device_id}/methods", json=body, headers={"Authorization": sas}
    ) as response:
        assert response.status == 200, await response.text()
        answer: dict[str, object] = await response.json()
        return answer


async def test_devhub_cli_serves_every_device_on_one_host_name(tmp_path: Path) -> None:
    host = fresh_loopback_ip()
    state, rest = tmp_path / "state", f"{host}:{free_port(host)}"
    hub = ManagedProcess(
        [*DEVHUB, "--state", str(state), "--rest", rest, "--dps", host], tmp_path / "devhub.log"
    )
    agents: list[AgentRunner] = []
    try:
        banner = hub.wait_for(lambda out: "add one with" in out)
        service = re.search(r"service connection string: (\S+)", banner).group(1)  # type: ignore[union-attr]
        ca_file = re.search(r"CA certificate:\s+(\S+)", banner).group(1)  # type: ignore[union-attr]
        assert service.startswith(f"HostName={rest};SharedAccessKeyName=service;SharedAccessKey=")
        assert f"device MQTT (TLS):         {host}:8883" in banner
        assert json.loads((state / "addresses.json").read_text())["mqtt"] == f"{host}:8883"

        strings = {}
        for name in ("cam9", "cam10"):  # separate commands, as users run them
            strings[name] = command("add-device", name, "--state", str(state)).strip()
            assert re.fullmatch(
                rf"HostName={re.escape(host)};DeviceId={name};SharedAccessKey=\S+", strings[name]
            ), strings[name]
            assert (
                command("connection-string", name, "--state", str(state)).strip() == strings[name]
            )

        key = service.split("SharedAccessKey=")[1]
        sas = generate_sas(rest, key, "service", int(time.time()) + 300)
        tls = ssl.create_default_context(cafile=ca_file)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls)) as http:
            async with http.put(
                f"https://{rest}/devices/api-cam?api-version=2021-04-12",
                json={"deviceId": "api-cam"},
                headers={"Authorization": sas},
            ) as response:
                assert response.status == 200
            assert command("connection-string", "api-cam", "--state", str(state)).startswith(
                f"HostName={host};DeviceId=api-cam;SharedAccessKey="
            )
            for name, connection_string in strings.items():
                agent = AgentRunner(
                    tmp_path / name,
                    {
                        "hub": {"connection_string": connection_string, "ca_file": ca_file},
                        "cameras": [],
                    },
                )
                agents.append(agent)
                agent.wait_connected()
            for name in strings:
                answer: dict[str, object] = {}
                for _ in range(100):  # the agent's method subscription follows its connection
                    try:
                        answer = await invoke(http, rest, sas, name)
                        break
                    except AssertionError:
                        await asyncio.sleep(0.1)
                assert answer["payload"]["message"] == "Local port is not available"  # type: ignore[index]
            # Both devices, one host name, one broker behind the front door.
            assert len(mosquittos_under(state)) == 1
            # The agents are done: the device client below takes cam9's identity, and IoT Hub
            # (like devhub) drops the older of two connections with one client id.
            for agent in agents:
                assert agent.stop() == 0

            # A device reports a property; the twin keeps it, even across a devhub restart.
            device_key = strings["cam9"].split("SharedAccessKey=")[1]
            async with aiomqtt.Client(
                host,
                8883,
                identifier="cam9",
                username=f"{host}/cam9/?api-version=2021-04-12",
                password=generate_sas(
                    f"{host}/devices/cam9", device_key, None, int(time.time()) + 60
                ),
                tls_context=tls,
            ) as device_mqtt:
                await device_mqtt.subscribe("$iothub/twin/res/#")
                await device_mqtt.publish(
                    "$iothub/twin/PATCH/properties/reported/?$rid=7",
                    json.dumps({"firmware": "1.2"}),
                )
                async for message in device_mqtt.messages:
                    assert str(message.topic).startswith("$iothub/twin/res/204/?$rid=7")
                    break

        enrollment = command("add-enrollment", "gw-dps", "--state", str(state))
        assert re.search(r"id scope:\s+0ne[0-9A-F]{8}", enrollment)
        assert f"DPS endpoint:   {host}:8883" in enrollment
        assert re.search(r"symmetric key:\s+\S{44}", enrollment)
    finally:
        for agent in agents:
            agent.stop()
        hub.signal(signal.SIGTERM)
        code = hub.wait(20)
    assert code == 0
    assert mosquittos_under(state) == []

    again = ManagedProcess(
        [*DEVHUB, "--state", str(state), "--rest", rest], tmp_path / "devhub2.log"
    )
    try:
        again.wait_for(lambda out: "add one with" in out)
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls)) as http,
            http.get(f"https://{rest}/twins/cam9", headers={"Authorization": sas}) as response,
        ):
            assert (await response.json())["properties"]["reported"]["firmware"] == "1.2"
    finally:
        again.signal(signal.SIGTERM)
        assert again.wait(20) == 0


@pytest.mark.parametrize("taken", ["rest", "mqtt"])
def test_devhub_reports_a_taken_port(tmp_path: Path, taken: str) -> None:
    host = fresh_loopback_ip()
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind((host, 8883 if taken == "mqtt" else 0))
        holder.listen()
        port = holder.getsockname()[1]
        rest_port = port if taken == "rest" else free_port(host)
        result = subprocess.run(
            [*DEVHUB, "--state", str(tmp_path), "--rest", f"{host}:{rest_port}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    assert f"{host}:{port}" in result.stderr and "in use" in result.stderr
    assert mosquittos_under(tmp_path) == []


async def test_a_missing_mosquitto_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(broker_module, "find_mosquitto", lambda: None)
    host = fresh_loopback_ip()
    with pytest.raises(BrokerError, match=re.escape(INSTALL_HINT)):
        await DevHub(tmp_path, f"{host}:{free_port(host)}").start()


def test_add_device_x509_issues_a_certificate_the_hub_accepts(tmp_path: Path) -> None:
    host = fresh_loopback_ip()
    state = tmp_path / "state"
    hub = ManagedProcess(
        [*DEVHUB, "--state", str(state), "--rest", f"{host}:{free_port(host)}"],
        tmp_path / "devhub.log",
    )
    try:
        banner = hub.wait_for(lambda out: "add one with" in out)
        ca_file = re.search(r"CA certificate:\s+(\S+)", banner).group(1)  # type: ignore[union-attr]
        printed = command("add-device", "xcam", "--x509", "--state", str(state))
        cert_file = re.search(r"certificate: (\S+)", printed).group(1)  # type: ignore[union-attr]
        key_file = re.search(r"key:\s+(\S+)", printed).group(1)  # type: ignore[union-attr]
        assert printed.splitlines()[-1] == f"HostName={host};DeviceId=xcam;x509=true"
        agent = AgentRunner(
            tmp_path / "agent",
            {
                "hub": {
                    "hostname": host,
                    "device_id": "xcam",
                    "cert_file": cert_file,
                    "key_file": key_file,
                    "ca_file": ca_file,
                },
                "cameras": [],
            },
        )
        try:
            agent.wait_connected()
            hub.wait_for(lambda out: "client=xcam" in out and "client_connected" in out)
        finally:
            agent.stop()
    finally:
        hub.signal(signal.SIGTERM)
        assert hub.wait(20) == 0
