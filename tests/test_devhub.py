"""``tunnel-agent devhub`` as users run it: start, add devices live, twins, errors, clean stop."""

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
from tests.support.net import free_port, fresh_loopback_block
from tests.support.processes import ManagedProcess
from tunnel_agent.cloud.devhub import broker as broker_module
from tunnel_agent.cloud.devhub.broker import INSTALL_HINT, BrokerError, BrokerSpec, MosquittoBroker
from tunnel_agent.cloud.sas import generate_sas

DEVHUB = [sys.executable, "-m", "tunnel_agent", "devhub"]


def mosquittos_under(folder: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "mosquitto" in (process.info["name"] or "") and str(folder) in cmdline:
            found.append(process)
    return found


async def test_devhub_cli_adds_devices_live_answers_methods_and_keeps_twins(tmp_path: Path) -> None:
    state, rest, block = tmp_path / "state", f"127.0.0.1:{free_port()}", fresh_loopback_block()
    hub = ManagedProcess(
        [*DEVHUB, "--state", str(state), "--rest", rest, "--address-block", block],
        tmp_path / "devhub.log",
    )
    try:
        banner = hub.wait_for(lambda out: "add one with" in out)
        service = re.search(r"service connection string: (\S+)", banner).group(1)  # type: ignore[union-attr]
        ca_file = re.search(r"CA certificate:\s+(\S+)", banner).group(1)  # type: ignore[union-attr]
        assert service.startswith(f"HostName={rest};SharedAccessKeyName=service;SharedAccessKey=")
        assert Path(ca_file).exists()

        added = subprocess.run(
            [*DEVHUB, "add-device", "cam9", "--state", str(state)],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        device = added.stdout.strip()
        match = re.fullmatch(r"HostName=(127\.[\d.]+);DeviceId=cam9;SharedAccessKey=\S+", device)
        assert match, device
        hub.wait_for(lambda out: "devhub.device_ready" in out and "cam9" in out, timeout_s=15)

        agent = AgentRunner(
            tmp_path / "agent",
            {"hub": {"connection_string": device, "ca_file": ca_file}, "cameras": []},
        )
        try:
            agent.wait_connected()
            key = service.split("SharedAccessKey=")[1]
            sas = generate_sas(rest, key, "service", int(time.time()) + 300)
            tls = ssl.create_default_context(cafile=ca_file)
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls)) as http:
                body = {
                    "methodName": "tunnelOpen",
                    "payload": {
                        "remoteEndpoint": "wss://x.example/t",
                        "remoteAuthorizationToken": "t",
                        "localPort": 554,
                    },
                    "responseTimeoutInSeconds": 10,
                }
                status, answer = 0, {}
                for _ in range(40):  # the emulator learns of the device within a second
                    async with http.post(
                        f"https://{rest}/twins/cam9/methods",
                        json=body,
                        headers={"Authorization": sas},
                    ) as response:
                        status, answer = response.status, await response.json()
                    if status != 404:
                        break
                    await asyncio.sleep(0.25)
                assert status == 200
                assert answer["payload"]["message"] == "Local port is not available"

                # A device reports a property; the twin keeps it, even across a devhub restart.
                async with aiomqtt.Client(
                    match.group(1), 8883, identifier="cam9-twin", tls_context=tls
                ) as device_mqtt:
                    await device_mqtt.subscribe("$iothub/twin/res/#")
                    await device_mqtt.publish(
                        "$iothub/twin/PATCH/properties/reported/?$rid=7",
                        json.dumps({"firmware": "1.2"}),
                    )
                    async for message in device_mqtt.messages:
                        assert str(message.topic).startswith("$iothub/twin/res/204/?$rid=7")
                        break
                async with http.get(
                    f"https://{rest}/twins/cam9", headers={"Authorization": sas}
                ) as response:
                    twin = await response.json()
                assert twin["properties"]["reported"]["firmware"] == "1.2"
        finally:
            agent.stop()

        assert len(mosquittos_under(state)) == 1  # one broker per device
    finally:
        hub.signal(signal.SIGTERM)
        code = hub.wait(20)
    assert code == 0
    assert mosquittos_under(state) == []

    again = ManagedProcess(
        [*DEVHUB, "--state", str(state), "--rest", rest], tmp_path / "devhub2.log"
    )
    try:
        again.wait_for(lambda out: "devices:                   cam9" in out)
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls)) as http,
            http.get(f"https://{rest}/twins/cam9", headers={"Authorization": sas}) as response,
        ):
            assert (await response.json())["properties"]["reported"]["firmware"] == "1.2"
    finally:
        again.signal(signal.SIGTERM)
        assert again.wait(20) == 0


def test_devhub_reports_a_taken_rest_port(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            [
                *DEVHUB,
                "--state",
                str(tmp_path),
                "--rest",
                f"127.0.0.1:{port}",
                "--address-block",
                fresh_loopback_block(),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    assert f"127.0.0.1:{port}" in result.stderr and "in use" in result.stderr


async def test_broker_reports_a_taken_port_and_a_missing_binary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tunnel_agent.cloud.devhub.certs import LocalCA

    ca = LocalCA(tmp_path / "ca")
    host = fresh_loopback_block().replace(".0/24", ".9")
    pair = ca.issue("b", [host])
    spec = BrokerSpec(host, tmp_path / "b", ca.cert_file, pair.cert_file, pair.key_file)
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind((host, 8883))
        holder.listen()
        with pytest.raises(BrokerError, match=f"{host}:8883 is already in use"):
            await MosquittoBroker(spec).start()

    monkeypatch.setattr(broker_module, "find_mosquitto", lambda: None)
    with pytest.raises(BrokerError, match=re.escape(INSTALL_HINT)):
        await MosquittoBroker(spec).start()
