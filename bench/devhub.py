"""devhub with a thousand devices: its memory per device and direct-method round trips across the
fleet, while real agents carry real camera tunnels through the same hub.

One ``tunnel-agent devhub`` process (and its mosquitto) on a loopback address of its own. The
devices are registered through the REST API (``PUT /devices/{id}``); a simulator process then
connects them all (MQTT over TLS, a SAS built as the SDK builds it, the SDK's user name with a
model id, ``$iothub/methods/POST/#`` at QoS 1) and answers every direct method. Alongside,
``--agents`` real ``tunnel-agent run`` processes connect to the same hub, a relay routes to each,
and one ``ffmpeg -c copy`` per agent plays the synthetic camera through relay -> agent -> camera
for the whole measurement. Round trips are timed as a service sees them: REST call to answer.

    python -m bench.devhub [--devices 1000] [--calls 2000] [--agents 20] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import random
import re
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import aiohttp
import psutil  # type: ignore[import-untyped]

from bench.common import Rig, entry_point, environment, percentile, table, wait_until
from tests.support import toml_writer
from tests.support.agent import AgentRunner
from tests.support.camera import RtspCamera
from tests.support.net import free_port
from tunnel_agent.cloud.devhub import mqtt_codec as mqtt
from tunnel_agent.cloud.sas import generate_sas
from tunnel_agent.demo import free_hub_host

TARGET_RSS_PER_DEVICE_KIB = 100.0
TARGET_METHOD_P99_MS = 100.0
CONNECT_CONCURRENCY = 50
SAS_LIFETIME_S = 3600
KEEPALIVE_S = 120


# -- the simulator (a child process: python -m bench.devhub --simulate FILE) -----------------------


def sdk_sas(resource: str, key: str, expiry: int) -> str:
    """A device SAS as azure-iot-device builds it (resource URL-encoded, its case kept)."""
    encoded = quote(resource, safe="")
    digest = hmac.new(base64.b64decode(key), f"{encoded}\n{expiry}".encode(), hashlib.sha256)
    signature = quote(base64.b64encode(digest.digest()).decode(), safe="")
    return f"SharedAccessSignature sr={encoded}&sig={signature}&se={expiry}"


class SimDevice:
    def __init__(self, host: str, device_id: str, key: str, tls: ssl.SSLContext) -> None:
        self.host, self.device_id, self.key, self.tls = host, device_id, key, tls
        self.answered = 0

    async def run(self, ready: asyncio.Event) -> None:
        reader, writer = await asyncio.open_connection(self.host, 8883, ssl=self.tls)
        username = (
            f"{self.host}/{self.device_id}/?api-version=2021-04-12&DeviceClientType=bench-sim"
            "&model-id=dtmi%3Abench%3ASimulatedDevice%3B1"
        )
        password = sdk_sas(
            f"{self.host}/devices/{self.device_id}", self.key, int(time.time()) + SAS_LIFETIME_S
        )
        writer.write(
            mqtt.encode_connect(
                mqtt.Connect(self.device_id, False, KEEPALIVE_S, username, password.encode())
            )
        )
        writer.write(mqtt.encode_subscribe(1, [("$iothub/methods/POST/#", 1)]))
        packets = mqtt.PacketReader(1 << 20)
        pinger = asyncio.get_running_loop().create_task(self._ping(writer))
        try:
            while data := await reader.read(65536):
                for packet in packets.feed(data):
                    if packet.kind == mqtt.CONNACK and mqtt.parse_connack(packet.body)[1] != 0:
                        raise RuntimeError(f"{self.device_id} refused: {packet.body!r}")
                    if packet.kind == mqtt.SUBACK:
                        ready.set()
                    elif packet.kind == mqtt.PUBLISH:
                        self._answer(writer, mqtt.parse_publish(packet.flags, packet.body))
                await writer.drain()
        finally:
            pinger.cancel()
            writer.close()

    def _answer(self, writer: asyncio.StreamWriter, publish: mqtt.Publish) -> None:
        if publish.qos and publish.packet_id is not None:
            writer.write(mqtt.encode_puback(publish.packet_id))
        rid = publish.topic.rsplit("$rid=", 1)[-1]
        topic = f"$iothub/methods/res/200/?$rid={rid}"
        writer.write(mqtt.encode_publish(mqtt.Publish(topic, publish.payload)))
        self.answered += 1

    @staticmethod
    async def _ping(writer: asyncio.StreamWriter) -> None:
        while True:
            await asyncio.sleep(KEEPALIVE_S / 2)
            writer.write(mqtt.PINGREQ_BYTES)


async def simulate(devices_file: Path) -> None:
    spec = json.loads(await asyncio.to_thread(devices_file.read_text))
    tls = ssl.create_default_context(cafile=spec["ca_file"])
    devices = [SimDevice(spec["host"], d, k, tls) for d, k in spec["devices"]]
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    tasks: list[asyncio.Task[None]] = []

    async def start(device: SimDevice) -> None:
        async with gate:
            ready = asyncio.Event()
            tasks.append(asyncio.create_task(device.run(ready)))
            await asyncio.wait_for(ready.wait(), 60)

    started = time.monotonic()
    await asyncio.gather(*(start(d) for d in devices))
    print(json.dumps({"ready": len(devices), "took_s": round(time.monotonic() - started, 1)}))
    sys.stdout.flush()
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    for task in done:
        task.result()


# -- the bench ------------------------------------------------------------------------------------


class Hub:
    """``tunnel-agent devhub`` as a child process, and its REST API."""

    def __init__(self, rig: Rig) -> None:
        self.host = free_hub_host()
        self.rest = f"{self.host}:{free_port(self.host)}"
        self.state = rig.folder / "devhub"
        self.log = rig.folder / "devhub.log"
        self.child = rig.spawn(
            "devhub",
            [
                sys.executable,
                "-m",
                "tunnel_agent",
                "devhub",
                "--state",
                str(self.state),
                "--rest",
                self.rest,
            ],
        )
        wait_until(lambda: "add one with" in self.child.log.read_text(), 30, "devhub to start")
        banner = self.child.log.read_text()
        self.service = re.search(r"service connection string: (\S+)", banner).group(1)  # type: ignore[union-attr]
        self.ca_file = re.search(r"CA certificate:\s+(\S+)", banner).group(1)  # type: ignore[union-attr]
        key = self.service.split("SharedAccessKey=")[1]
        self.sas = generate_sas(self.rest, key, "service", int(time.time()) + SAS_LIFETIME_S)
        self.tls = ssl.create_default_context(cafile=self.ca_file)

    def rss_bytes(self) -> tuple[int, int]:
        """(devhub process, its mosquitto)."""
        devhub = psutil.Process(self.child.pid)
        broker = [p for p in devhub.children(recursive=True) if "mosquitto" in p.name()]
        return devhub.memory_info().rss, sum(p.memory_info().rss for p in broker)

    async def register(self, names: list[str]) -> dict[str, str]:
        """PUT /devices/{id} for each; their primary keys."""
        keys: dict[str, str] = {}
        gate = asyncio.Semaphore(8)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.tls)) as http:

            async def put(name: str) -> None:
                async with (
                    gate,
                    http.put(
                        f"https://{self.rest}/devices/{name}?api-version=2021-04-12",
                        json={"deviceId": name},
                        headers={"Authorization": self.sas},
                    ) as response,
                ):
                    body = await response.json()
                    if response.status != 200:
                        raise RuntimeError(f"PUT {name}: {response.status} {body}")
                    keys[name] = body["authentication"]["symmetricKey"]["primaryKey"]

            await asyncio.gather(*(put(n) for n in names))
        return keys

    async def connected(self) -> int:
        query = {"query": "SELECT * FROM devices WHERE connectionState = 'Connected'"}
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.tls)) as http,
            http.post(
                f"https://{self.rest}/devices/query?api-version=2021-04-12",
                json=query,
                headers={"Authorization": self.sas, "x-ms-max-item-count": "100000"},
            ) as response,
        ):
            return len(await response.json())

    async def round_trips(self, names: list[str], calls: int, concurrency: int) -> list[float]:
        """``calls`` direct methods on devices drawn at random; each call's ms."""
        timings: list[float] = []
        order = [random.choice(names) for _ in range(calls)]
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.tls)) as http:

            async def worker() -> None:
                while order:
                    name = order.pop()
                    body = {
                        "methodName": "ping",
                        "payload": {"n": len(order)},
                        "responseTimeoutInSeconds": 10,
                    }
                    started = time.perf_counter()
                    async with http.post(
                        f"https://{self.rest}/twins/{name}/methods?api-version=2021-04-12",
                        json=body,
                        headers={"Authorization": self.sas},
                    ) as response:
                        answer = await response.json()
                    timings.append((time.perf_counter() - started) * 1000)
                    if response.status != 200 or answer.get("status") != 200:
                        raise RuntimeError(f"method on {name}: {response.status} {answer}")

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return timings


def start_relay(rig: Rig, hub: Hub, agents: list[str], camera: RtspCamera) -> dict[str, int]:
    """A relay with one route per agent; route ports by device id."""
    port = free_port()
    pair = rig.cert("relay")
    routes = {name: free_port() for name in agents}
    config = {
        "relay": {
            "listen": f"127.0.0.1:{port}",
            "public_url": f"wss://127.0.0.1:{port}",
            "cert_file": str(pair.cert_file),
            "key_file": str(pair.key_file),
        },
        "iothub": {"service_connection_string": hub.service, "ca_file": hub.ca_file},
        "routes": [
            {"listen": f"127.0.0.1:{routes[n]}", "device_id": n, "local_port": camera.port}
            for n in agents
        ],
    }
    config_file = rig.folder / "relay.toml"
    config_file.write_text(toml_writer.dumps(config))
    rig.spawn(
        "relay", [sys.executable, "-m", "tunnel_agent", "relay", "--config", str(config_file)]
    )
    wait_until(lambda: _listening(port), 30, "the relay to listen")
    return routes


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def ffmpeg_frames(log: Path) -> int:
    found = re.findall(r"frame=\s*(\d+)", log.read_text(errors="replace")) if log.exists() else []
    return int(found[-1]) if found else 0


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.devhub")
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=4, help="direct methods in flight")
    parser.add_argument("--simulate", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.simulate is not None:
        asyncio.run(simulate(args.simulate))
        return
    print(f"devhub with {args.devices} devices and {args.agents} agents; {environment()}")
    with Rig("devhub", hub=False) as rig:
        hub = Hub(rig)
        sims = [f"sim-{i:04d}" for i in range(args.devices)]
        agents = [f"agent-{i:02d}" for i in range(args.agents)]
        started = time.monotonic()
        keys = asyncio.run(hub.register(sims + agents))
        registered_s = time.monotonic() - started
        idle_devhub, idle_broker = hub.rss_bytes()

        spec = rig.folder / "devices.json"
        spec.write_text(
            json.dumps(
                {"host": hub.host, "ca_file": hub.ca_file, "devices": [[n, keys[n]] for n in sims]}
            )
        )
        sim = rig.spawn(
            "simulator", [sys.executable, "-m", "bench.devhub", "--simulate", str(spec)]
        )
        wait_until(
            lambda: '"ready"' in sim.log.read_text(), 300, "the simulated devices to connect"
        )
        connect_s = json.loads(
            next(line for line in sim.log.read_text().splitlines() if '"ready"' in line)
        )["took_s"]
        wait_until(lambda: asyncio.run(hub.connected()) >= args.devices, 60, "the hub to see them")
        time.sleep(2)  # let allocations settle before reading RSS
        full_devhub, full_broker = hub.rss_bytes()

        camera = RtspCamera(rig.folder / "camera")
        try:
            runners = [
                AgentRunner(
                    rig.folder / name,
                    {
                        "hub": {
                            "connection_string": f"HostName={hub.host};DeviceId={name};"
                            f"SharedAccessKey={keys[name]}",
                            "ca_file": hub.ca_file,
                        },
                        "tunnel": {"ca_file": str(rig.ca.cert_file)},
                        "cameras": [{"name": "cam", "host": camera.host, "ports": [camera.port]}],
                    },
                )
                for name in agents
            ]
            rig.agents.extend(runners)
            for runner in runners:
                runner.wait_connected(60)
            routes = start_relay(rig, hub, agents, camera)
            players = []
            for name in agents:
                log = rig.folder / f"ffmpeg-{name}.log"
                url = f"rtsp://127.0.0.1:{routes[name]}/test"
                command = [
                    "ffmpeg",
                    "-nostdin",
                    "-loglevel",
                    "info",
                    "-stats_period",
                    "0.5",
                    "-rtsp_transport",
                    "tcp",
                    "-i",
                    url,
                    "-c",
                    "copy",
                    "-f",
                    "null",
                    "-",
                ]
                with log.open("w") as handle:
                    players.append(
                        (
                            name,
                            log,
                            subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=handle),
                        )
                    )
            wait_until(
                lambda: all(ffmpeg_frames(log) > 0 for _, log, _ in players),
                90,
                "video through every tunnel",
            )
            frames_before = {name: ffmpeg_frames(log) for name, log, _ in players}
            timings = asyncio.run(hub.round_trips(sims, args.calls, args.concurrency))
            time.sleep(1.5)  # a progress line of every player after the last call
            frames_after = {name: ffmpeg_frames(log) for name, log, _ in players}
            during_devhub, during_broker = hub.rss_bytes()
            for _, _, process in players:
                process.terminate()
            for _, _, process in players:
                process.wait(10)
        finally:
            camera.stop()

    per_device = (full_devhub + full_broker - idle_devhub - idle_broker) / args.devices / 1024
    p99 = percentile(timings, 0.99)
    moving = sum(1 for n in agents if frames_after[n] > frames_before[n])
    mib = 1024 * 1024
    print()
    print(
        f"registered {len(keys)} devices through PUT /devices/{{id}} in {registered_s:.1f} s; "
        f"{args.devices} simulated devices connected in {connect_s} s"
    )
    rows: list[list[object]] = [
        [
            "devhub RSS, devices registered, none connected (MiB)",
            round(idle_devhub / mib, 1),
            round(idle_broker / mib, 1),
            "",
        ],
        [
            f"devhub RSS, {args.devices} devices connected (MiB)",
            round(full_devhub / mib, 1),
            round(full_broker / mib, 1),
            "",
        ],
        [
            f"... with {args.agents} agents and tunnels, after the calls (MiB)",
            round(during_devhub / mib, 1),
            round(during_broker / mib, 1),
            "",
        ],
        [
            "RSS per connected device, devhub + mosquitto (KiB)",
            round((full_devhub - idle_devhub) / args.devices / 1024, 1),
            round((full_broker - idle_broker) / args.devices / 1024, 1),
            f"{per_device:.1f} total, <= {TARGET_RSS_PER_DEVICE_KIB:g} "
            + ("met" if per_device <= TARGET_RSS_PER_DEVICE_KIB else "MISSED"),
        ],
    ]
    print(table(["memory", "devhub", "mosquitto", "target"], rows))
    print()
    method_rows: list[list[object]] = [
        [
            f"{len(timings)} calls over {args.devices} devices, {args.concurrency} in flight",
            percentile(timings, 0.5),
            percentile(timings, 0.9),
            p99,
            max(timings),
            f"<= {TARGET_METHOD_P99_MS:g} {'met' if p99 <= TARGET_METHOD_P99_MS else 'MISSED'}",
        ]
    ]
    print(
        table(
            ["direct method REST round trip (ms)", "p50", "p90", "p99", "max", "p99 target"],
            method_rows,
        )
    )
    print()
    during = [frames_after[n] - frames_before[n] for n in agents]
    print(
        f"camera tunnels: {moving}/{args.agents} agents carried video during the calls "
        f"(frames per player in that time: min {min(during)}, max {max(during)})"
    )


if __name__ == "__main__":
    entry_point(main)
