"""``tunnel-agent demo``: the whole path on one machine, no cloud account.

consumer (PyAV) -> relay -> IoT Hub emulator (direct method tunnelOpen) -> agent -> camera, and the
video back through the agent's WebSocket. Everything runs on loopback: the emulator and the relay
in this process, the agent and the synthetic camera as child processes, as they would be deployed.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import aiohttp
import av
import av.video.frame

from tunnel_agent.cloud.devhub.broker import INSTALL_HINT, BrokerError, find_mosquitto
from tunnel_agent.cloud.devhub.hub import MQTT_PORT, DevHub
from tunnel_agent.cloud.relay.runner import RunningRelay, start_relay
from tunnel_agent.cloud.relay.settings import RelaySettings
from tunnel_agent.media.encode import encode_image
from tunnel_agent.ports import pick_free_ports

SYSTEM_PYTHON = "/usr/bin/python3"
CAMERA_SCRIPT = Path(__file__).parent / "sim" / "rtsp_camera.py"
GST_HINT = (
    "the synthetic camera needs GStreamer's RTSP server for the system Python (Debian/Ubuntu: "
    "sudo apt-get install python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base "
    "gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly gstreamer1.0-plugins-bad)"
)
DEVICE_ID = "demo-camera"
START_TIMEOUT_S = 30.0
SNAPSHOT_AFTER_S = 1.0


class DemoError(Exception):
    """A prerequisite is missing or a part did not start; the message says what to do."""


def missing_prerequisites() -> list[str]:
    problems = []
    if find_mosquitto() is None:
        problems.append(INSTALL_HINT)
    if not Path(SYSTEM_PYTHON).exists():
        problems.append(GST_HINT)
    else:
        check = subprocess.run(
            [SYSTEM_PYTHON, str(CAMERA_SCRIPT), "--check"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if check.returncode != 0:
            detail = (check.stdout + check.stderr).strip().splitlines()
            problems.append(f"{GST_HINT}; it said: {detail[-1] if detail else 'nothing'}")
    return problems


_picked: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now and never picked before by this demo (see ``tunnel_agent.ports``)."""
    (port,) = pick_free_ports(1, host, avoid=_picked)
    _picked.add(port)
    return port


def free_hub_host() -> str:
    """A loopback address with 8883 free (another devhub may run on 127.0.0.1)."""
    for _ in range(50):
        host = f"127.{random.randint(100, 199)}.{random.randint(0, 255)}.{random.randint(2, 254)}"  # noqa: S311
        with socket.socket() as sock:
            try:
                sock.bind((host, MQTT_PORT))
            except OSError:
                continue
        return host
    raise DemoError("no free loopback address for the emulator's MQTT endpoint")


@dataclass
class Playback:
    """What the consumer saw, filled in by the decoding thread."""

    frames: int = 0
    keyframes: int = 0
    video_bytes: int = 0
    width: int = 0
    height: int = 0
    codec: str = ""
    snapshot: bytes | None = None
    error: str | None = None
    started: float = field(default_factory=time.monotonic)


def play(url: str, seconds: float, playback: Playback, stop: threading.Event) -> None:
    """Decode video from ``url`` for ``seconds`` (runs in a thread: PyAV blocks)."""
    try:
        options = {"rtsp_transport": "tcp", "timeout": "10000000"}
        with av.open(url, options=options, timeout=(15, 10)) as container:
            stream = container.streams.video[0]
            playback.codec = stream.codec_context.name
            playback.started = time.monotonic()
            for packet in container.demux(stream):
                playback.video_bytes += packet.size
                if packet.is_keyframe:
                    playback.keyframes += 1
                for frame in packet.decode():
                    assert isinstance(frame, av.video.frame.VideoFrame)
                    playback.frames += 1
                    playback.width, playback.height = frame.width, frame.height
                    elapsed = time.monotonic() - playback.started
                    if playback.snapshot is None and elapsed >= SNAPSHOT_AFTER_S:
                        playback.snapshot = encode_image(frame, "jpeg")
                if stop.is_set() or time.monotonic() - playback.started >= seconds:
                    return
    except Exception as exc:  # reported in the summary, the demo then fails
        playback.error = f"{type(exc).__name__}: {exc}"


class Demo:
    def __init__(self, folder: Path, out: TextIO) -> None:
        self.folder = folder
        self.out = out
        self.devhub: DevHub | None = None
        self.relay: RunningRelay | None = None
        self.camera: subprocess.Popen[bytes] | None = None
        self.agent: subprocess.Popen[bytes] | None = None
        self.camera_port = free_port()
        self.route_port = free_port()
        self.relay_port = 0
        self.api_key = secrets.token_urlsafe(24)  # for the relay's session API, this run only

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    async def start(self) -> None:
        self.say(f"tunnel-agent demo: everything on loopback, files in {self.folder}")
        host = free_hub_host()
        self.devhub = DevHub(self.folder / "devhub", f"{host}:{free_port(host)}")
        await self.devhub.start()
        self.devhub.add_device(DEVICE_ID)
        self.say(
            f"  IoT Hub emulator  REST {self.devhub.rest_url}, "
            f"devices mqtts://{self.devhub.addresses.mqtt}"
        )

        self.camera = await asyncio.to_thread(self._start_camera)
        self.say(
            f"  camera            rtsp://127.0.0.1:{self.camera_port}/test (H.264 640x360, 15 fps)"
        )

        ca = str(self.devhub.ca.cert_file)
        self.agent = self._start_agent(self.devhub.connection_string(DEVICE_ID), ca)
        try:
            await self.devhub.wait_device(DEVICE_ID, START_TIMEOUT_S)
        except TimeoutError:
            raise DemoError(
                f"the agent did not connect to the emulator; see {self.folder / 'agent.log'}"
            ) from None
        self.say(f"  agent             connected as {DEVICE_ID} (log: {self.folder / 'agent.log'})")

        self.relay_port = relay_port = free_port()
        tls = self.devhub.ca.issue("relay", ["127.0.0.1", "localhost"])
        route = {
            "listen": f"127.0.0.1:{self.route_port}",
            "device_id": DEVICE_ID,
            "local_port": self.camera_port,
            "name": "camera",
        }
        settings = RelaySettings.model_validate(
            {
                "relay": {
                    "listen": f"127.0.0.1:{relay_port}",
                    "public_url": f"wss://127.0.0.1:{relay_port}",
                    "metrics_listen": f"127.0.0.1:{free_port()}",
                    "cert_file": tls.cert_file,
                    "key_file": tls.key_file,
                    "api_key": self.api_key,
                },
                "iothub": {
                    "service_connection_string": self.devhub.service_connection_string,
                    "ca_file": ca,
                },
                "routes": [route],
            }
        )
        self.relay = await start_relay(settings)
        self.say(
            f"  relay             wss://127.0.0.1:{relay_port}, "
            f"consumer port rtsp://127.0.0.1:{self.route_port}/test"
        )

    def _start_camera(self) -> subprocess.Popen[bytes]:
        log = (self.folder / "camera.log").open("wb")
        process = subprocess.Popen(
            [SYSTEM_PYTHON, str(CAMERA_SCRIPT), "--port", str(self.camera_port)],
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        assert process.stdout is not None
        line = process.stdout.readline().decode().strip()
        if not line.startswith("READY"):
            process.kill()
            raise DemoError(
                f"the synthetic camera did not start ({line or 'no output'}); "
                f"see {self.folder / 'camera.log'}"
            )
        return process

    def _start_agent(self, connection_string: str, ca_file: str) -> subprocess.Popen[bytes]:
        config = self.folder / "agent.toml"
        config.write_text(
            "[hub]\n"
            f'connection_string = "{connection_string}"\n'
            f'ca_file = "{ca_file}"\n\n'
            "[tunnel]\n"
            f'ca_file = "{ca_file}"\n'
            'allowed_remote_hosts = ["127.0.0.1"]\n\n'
            "[media]\n"
            f'output_root = "{self.folder / "media"}"\n\n'
            "[[cameras]]\n"
            'name = "demo"\n'
            'host = "127.0.0.1"\n'
            f"ports = [{self.camera_port}]\n"
            f'url = "rtsp://127.0.0.1:{self.camera_port}/test"\n'
            'make = "tunnel-agent"\n'
            'model = "synthetic"\n'
        )
        config.chmod(0o600)
        log = (self.folder / "agent.log").open("wb")
        return subprocess.Popen(
            [sys.executable, "-m", "tunnel_agent", "run", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    async def view_session(self) -> dict[str, str]:
        """A session made through the relay's API, as a user makes one: its answer has the link
        that opens the camera in a browser."""
        assert self.relay is not None and self.devhub is not None
        base = f"https://127.0.0.1:{self.relay.port}"
        body = {"deviceId": DEVICE_ID, "localPort": self.camera_port, "rtspPath": "/test"}
        tls = ssl.create_default_context(cafile=str(self.devhub.ca.cert_file))
        headers = {"Authorization": f"Bearer {self.api_key}"}
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
            http.post(f"{base}/v1/sessions", json=body, headers=headers, ssl=tls) as response,
        ):
            answer: dict[str, str] = await response.json()
        if response.status != 201:
            raise DemoError(f"the relay refused a session: {response.status} {answer}")
        key_file = self.folder / "api-key"
        key_file.write_text(self.api_key + "\n")
        key_file.chmod(0o600)
        return answer

    async def watch(self, seconds: float) -> Playback:
        playback, stop = Playback(), threading.Event()
        url = f"rtsp://127.0.0.1:{self.route_port}/test"
        self.say(f"playing {url} through relay -> hub -> agent -> camera for {seconds:g} s")
        player = asyncio.get_running_loop().run_in_executor(
            None, play, url, seconds, playback, stop
        )
        started, last = time.monotonic(), (0, 0)
        try:
            while not player.done():
                await asyncio.wait({player}, timeout=1.0)
                self.say(self._progress(time.monotonic() - started, playback, last))
                last = (playback.frames, playback.video_bytes)
        finally:
            stop.set()
            await player
        return playback

    def _progress(self, elapsed: float, playback: Playback, last: tuple[int, int]) -> str:
        """One line a second: what arrived since the previous line, and the tunnel's totals."""
        to_consumer = to_device = 0
        if self.relay is not None:
            for tunnel in self.relay.relay.tunnels.values():
                to_consumer += tunnel.bytes_to_consumer
                to_device += tunnel.bytes_to_device
        if playback.frames == 0:
            state = "opening the stream (RTSP DESCRIBE/SETUP/PLAY through the tunnel)"
        else:
            state = (
                f"{playback.frames:4d} frames  {playback.frames - last[0]:3d} fps  "
                f"{(playback.video_bytes - last[1]) * 8 / 1000:6.0f} kbit/s"
            )
        return (
            f"  {elapsed:5.1f} s  {state}  tunnel: {to_consumer / 1024:7.1f} KiB from camera, "
            f"{to_device / 1024:4.1f} KiB to camera"
        )

    def summary(self, playback: Playback, snapshot: Path | None) -> bool:
        record = self.relay.relay.history[-1] if self.relay and self.relay.relay.history else None
        live = next(iter(self.relay.relay.tunnels.values()), None) if self.relay else None
        rtt = record.open_rtt_ms if record else (live.open_rtt_ms if live else None)
        ok = playback.error is None and playback.frames > 0
        self.say("summary")
        self.say(
            f"  tunnelOpen round trip   {rtt if rtt is not None else '-'} ms "
            "(relay -> hub -> agent -> answer)"
        )
        self.say(
            f"  frames decoded          {playback.frames} "
            f"({playback.codec} {playback.width}x{playback.height}, {playback.keyframes} keyframes)"
        )
        if record is not None:
            self.say(f"  bytes camera -> viewer  {record.bytes_to_consumer}")
            self.say(f"  bytes viewer -> camera  {record.bytes_to_device}")
        agent_line = self._agent_closed_line()
        if agent_line:
            self.say(f"  agent's closing line    {agent_line}")
        self.say(f"  snapshot                {snapshot if snapshot else 'none'}")
        if playback.error:
            self.say(f"  error                   {playback.error}")
        self.say("demo " + ("OK" if ok else "FAILED"))
        return ok

    def _agent_closed_line(self) -> str | None:
        log = self.folder / "agent.log"
        with contextlib.suppress(OSError):
            for line in reversed(log.read_text().splitlines()):
                if " tunnel.closed " in line:
                    return re.sub(r"^\S+ \S+ \S+ ", "", line)
        return None

    async def stop(self) -> None:
        if self.relay is not None:
            await self.relay.stop()
        for process in (self.agent, self.camera):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.to_thread(process.wait, 10)
                except subprocess.TimeoutExpired:
                    process.kill()
        if self.devhub is not None:
            await self.devhub.stop()


async def _demo(folder: Path, seconds: float, keep_running: bool, out: TextIO) -> bool:
    demo = Demo(folder, out)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await demo.start()
        playback = await demo.watch(seconds)
        await asyncio.sleep(0.5)  # let the tunnel's closing lines land
        snapshot = None
        if playback.snapshot:
            snapshot = folder / "snapshot.jpg"
            snapshot.write_bytes(playback.snapshot)
        ok = demo.summary(playback, snapshot)
        if keep_running and ok:
            session = await demo.view_session()
            demo.say("still running; Ctrl-C stops")
            demo.say(f"  watch in a browser  {session['viewUrl']}")
            ca_file = demo.devhub.ca.cert_file if demo.devhub else "?"
            demo.say(
                f"    (the relay's certificate is from the demo's own CA, {ca_file}: "
                "accept the browser's warning or trust that CA)"
            )
            demo.say(
                f"  sessions page       https://127.0.0.1:{demo.relay_port}/ "
                f"(API key in {demo.folder / 'api-key'})"
            )
            demo.say(f"  RTSP player         rtsp://127.0.0.1:{demo.route_port}/test (VLC, ffplay)")
            await stop.wait()
        return ok
    finally:
        await demo.stop()


def run_demo(
    seconds: float = 10.0,
    keep_running: bool = False,
    output: Path | None = None,
    out: TextIO = sys.stdout,
) -> int:
    problems = missing_prerequisites()
    if problems:
        for problem in problems:
            print(f"tunnel-agent demo: {problem}", file=sys.stderr)
        return 1
    folder = output or Path(tempfile.mkdtemp(prefix="tunnel-agent-demo-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        ok = asyncio.run(_demo(folder, seconds, keep_running, out))
    except (DemoError, BrokerError, OSError) as exc:
        print(f"tunnel-agent demo: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1
