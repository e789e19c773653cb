"""The browser view: relay CPU per watched session and per viewer next to ffmpeg, time from the view
link to the first frame, and camera-to-screen latency, all through the real path.

devhub (the IoT Hub emulator, in this process) -> ``tunnel-agent run`` -> gst-rtsp-server cameras;
the relay with the view in a child process (whose CPU is measured); viewers are WebSocket clients
in this process (for CPU) or headless Chromium (first frame, latency).

- CPU: per round, the relay idle; ``--sessions`` tunnels carrying ffmpeg (the plain tunnel, no
  view); ``--sessions`` sessions x 1 viewer; ``--sessions`` ``ffmpeg -rtsp_transport tcp -i
  <camera> -c copy -f mp4 -movflags frag_keyframe+empty_moov pipe:1 > /dev/null`` on the same
  camera (1080p25, 4000 kbit/s, GOP 25); then 1 session x 1 viewer, 1 session x ``--viewers``
  viewers and 1 ffmpeg. Each is a ``--seconds`` window after a settle. The three cases the ratio is
  made of run back to back in every round, so that each round's ratio compares like with like,
  and every round's ratio is printed as it ends. Per session = (N sessions - idle) / N; per viewer
  = (1 x V - 1 x 1) / (V - 1); the view alone = per session - per plain tunnel; the ratio is the
  view alone over ffmpeg per stream. The relay's share includes everything it does for a session:
  the device's WebSocket (TLS), the tunnel, RTSP reading and remuxing, and TLS WebSockets out,
  all on its event loop (the row "outside the event loop" shows that no thread does any of it).
- First frame: a new session per run, Chromium opens the view link; the page's own
  ``performance.now()`` at its first presented frame (``requestVideoFrameCallback``) is the time
  from navigation start. That includes tunnelOpen, RTSP set-up and the wait for a keyframe.
- Latency: a camera that burns its wall clock into the picture (``rtsp_camera.py --clock``, 640x360,
  15 fps); for each frame Chromium presents, a script draws it to a canvas, reads the clock back
  from the pixels and subtracts it from ``Date.now()`` (same machine, same clock).

    python -m bench.view [--seconds 15] [--settle 3] [--rounds 3] [--sessions 4] [--viewers 8]
                         [--first-frame-runs 5] [--latency-seconds 15]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import ssl
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]

from bench.common import (
    LOOPBACK,
    Child,
    cpu_seconds,
    entry_point,
    environment,
    median,
    percentile,
    table,
    wait_until,
)
from bench.peers import _serve_stdin
from tests.support.agent import AgentRunner
from tests.support.browser import Browser
from tests.support.camera import CAMERA_SCRIPT, SYSTEM_PYTHON
from tests.support.net import free_port, fresh_loopback_ip
from tests.support.threadloop import ThreadLoop
from tunnel_agent.cloud.devhub.hub import DevHub

API_KEY = "bench-view-api-key-0123"
CPU_CAMERA = ["--width", "1920", "--height", "1080", "--fps", "25", "--gop", "25", "--kbps", "4000"]
TARGET_RATIO = 2.0
TARGET_FIRST_FRAME_S = 3.0
TARGET_LATENCY_S = 1.5
GRACE_S = 3.0
STAGGER_S = 0.5

READ_CLOCK = """
window.latencies = [];
const v = document.getElementById('video');
const canvas = document.createElement('canvas');
const ctx = canvas.getContext('2d', {willReadFrequently: true});
function onFrame() {
  if (v.videoWidth) {
    canvas.width = v.videoWidth; canvas.height = 32;
    ctx.drawImage(v, 0, 0, v.videoWidth, 32, 0, 0, v.videoWidth, 32);
    const row = ctx.getImageData(0, 16, v.videoWidth, 1).data;
    const bit = v.videoWidth / 32;
    let value = 0;
    for (let b = 0; b < 32; b++) {
      value = value * 2 + (row[Math.floor(b * bit + bit / 2) * 4] > 128 ? 1 : 0);
    }
    let delay = Date.now() % 4294967296 - value;
    if (delay < 0) delay += 4294967296;
    window.latencies.push(delay);
  }
  v.requestVideoFrameCallback(onFrame);
}
v.requestVideoFrameCallback(onFrame);
"""


# -- the relay with the view, in its own process ---------------------------------------------------


async def serve(config_file: str) -> None:
    """Child: the relay (the view is its extension); ``stats`` on stdin answers the watch count."""
    from tunnel_agent.cloud.relay.runner import start_relay
    from tunnel_agent.cloud.relay.settings import RelaySettings
    from tunnel_agent.cloud.relay.view.extension import ViewExtension

    config = json.loads(Path(config_file).read_text())  # noqa: ASYNC240 (start-up, once)
    relay = await start_relay(RelaySettings.model_validate(config["settings"]))
    view = next(e for e in relay.extensions if isinstance(e, ViewExtension))

    def command(line: str) -> None:
        print(json.dumps({"watches": len(view.service.watches)}), flush=True)

    print(json.dumps({"ready": True}), flush=True)
    loop = asyncio.get_running_loop()
    await _serve_stdin(loop, command)
    await relay.stop()


# -- the rig -------------------------------------------------------------------------------------


class ViewRig:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.children: list[Child] = []
        self.loop = ThreadLoop("bench-view")
        hub_host = fresh_loopback_ip()
        self.devhub = DevHub(folder / "devhub", f"{hub_host}:{free_port(hub_host)}")
        self.loop.run(self.devhub.start())
        self.devhub.add_device("bench-view")
        self.cameras = {
            "cpu": self._camera("camera-cpu", CPU_CAMERA),
            "clock": self._camera("camera-clock", ["--clock"]),
        }
        ca_file = str(self.devhub.ca.cert_file)
        self.agent = AgentRunner(
            folder / "agent",
            {
                "hub": {
                    "connection_string": self.devhub.connection_string("bench-view"),
                    "ca_file": ca_file,
                },
                "tunnel": {"ca_file": ca_file, "max_tunnels": 64},
                "cameras": [
                    {"name": "cpu", "host": LOOPBACK, "ports": [self.cameras["cpu"]]},
                    {"name": "clock", "host": LOOPBACK, "ports": [self.cameras["clock"]]},
                ],
            },
        )
        self.agent.wait_connected()
        self.loop.run(self.devhub.wait_device("bench-view", 20))
        self.relay_port = relay_port = free_port()
        self.route_ports = {name: free_port() for name in self.cameras}
        tls = self.devhub.ca.issue("relay", [LOOPBACK])
        config = {
            "settings": {
                "relay": {
                    "listen": f"{LOOPBACK}:{relay_port}",
                    "public_url": f"wss://{LOOPBACK}:{relay_port}",
                    "cert_file": str(tls.cert_file),
                    "key_file": str(tls.key_file),
                    "api_key": API_KEY,
                    "metrics_listen": f"{LOOPBACK}:{free_port()}",
                    "max_tunnels_per_device": 64,
                    "view_grace_period": GRACE_S,
                },
                "iothub": {
                    "service_connection_string": self.devhub.service_connection_string,
                    "ca_file": ca_file,
                },
                "routes": [
                    {
                        "listen": f"{LOOPBACK}:{self.route_ports[name]}",
                        "device_id": "bench-view",
                        "local_port": port,
                        "name": name,
                    }
                    for name, port in self.cameras.items()
                ],
            },
        }
        (folder / "relay.json").write_text(json.dumps(config))
        self.relay = self._spawn(
            "relay",
            [sys.executable, "-m", "bench.view", "--serve", str(folder / "relay.json")],
            control=True,
        )
        self.tls = ssl.create_default_context(cafile=ca_file)
        self.relay.read_json(30)

    def _spawn(self, name: str, args: list[str], *, control: bool = False) -> Child:
        child = Child(args, self.folder / f"{name}.log", control=control)
        self.children.append(child)
        return child

    def _camera(self, name: str, extra: list[str]) -> int:
        port = free_port()
        child = self._spawn(
            name,
            [SYSTEM_PYTHON, str(CAMERA_SCRIPT), "--host", LOOPBACK, "--port", str(port), *extra],
        )
        wait_until(lambda: "READY" in child.log.read_text(errors="replace"), 20, name)
        return port

    def camera_url(self, name: str, *, through_relay: bool = False) -> str:
        port = self.route_ports[name] if through_relay else self.cameras[name]
        return f"rtsp://{LOOPBACK}:{port}/test"

    def session(self, camera: str) -> dict[str, Any]:
        """A session on ``camera`` through the relay's API, as users make them."""
        return self.loop.run(self._create_session(camera))

    async def _create_session(self, camera: str) -> dict[str, Any]:
        import aiohttp

        body = {"deviceId": "bench-view", "localPort": self.cameras[camera], "rtspPath": "/test"}
        headers = {"Authorization": f"Bearer {API_KEY}"}
        url = f"https://{LOOPBACK}:{self.relay_port}/v1/sessions"
        async with (
            aiohttp.ClientSession() as client,
            client.post(url, json=body, headers=headers, ssl=self.tls) as response,
        ):
            answer: dict[str, Any] = await response.json()
            if response.status != 201:
                raise RuntimeError(f"POST /v1/sessions: {response.status} {answer}")
            return answer

    def wait_no_watches(self) -> None:
        wait_until(lambda: self.relay.request("stats")["watches"] == 0, 30, "watches to close")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.agent.stop()
        for child in reversed(self.children):
            child.stop()
        with contextlib.suppress(Exception):
            self.loop.run(self.devhub.stop())
        self.loop.close()


# -- viewers that only count bytes (for CPU) ------------------------------------------------------


class Viewers:
    """WebSocket viewers on the rig's loop: authenticate, then read and count everything.

    They offer permessage-deflate as Chromium and Firefox do, so the relay's answer to that offer
    is part of what is measured."""

    def __init__(self, rig: ViewRig) -> None:
        self.rig = rig
        self.bytes: dict[int, int] = {}
        self._tasks: list[Any] = []

    def start(self, session: dict[str, Any], count: int) -> None:
        for _ in range(count):
            index = len(self.bytes)
            self.bytes[index] = 0
            self._tasks.append(
                asyncio.run_coroutine_threadsafe(
                    self._view(index, session["id"], session["token"]), self.rig.loop.loop
                )
            )

    async def _view(self, index: int, session_id: str, token: str) -> None:
        import aiohttp

        url = f"wss://{LOOPBACK}:{self.rig.relay_port}/v1/sessions/{session_id}/live"
        async with (
            aiohttp.ClientSession() as client,
            # compress=15: offer permessage-deflate, as browsers do.
            client.ws_connect(url, ssl=self.rig.tls, max_msg_size=0, compress=15) as ws,
        ):
            await ws.send_str(json.dumps({"type": "auth", "token": token}))
            async for message in ws:
                if message.type == aiohttp.WSMsgType.BINARY:
                    self.bytes[index] += len(message.data)

    def all_receiving(self) -> bool:
        return all(size > 100_000 for size in self.bytes.values())

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        self.bytes.clear()


# -- measurements -------------------------------------------------------------------------------


def cpu_pct(pids: list[int], seconds: float) -> float:
    before = sum(cpu_seconds(pid) for pid in pids)
    started = time.monotonic()
    time.sleep(seconds)
    used = sum(cpu_seconds(pid) for pid in pids) - before
    return used / (time.monotonic() - started) * 100


def thread_seconds(pid: int) -> dict[int, float]:
    """User + system CPU time of each thread of ``pid``, by thread id."""
    return {t.id: t.user_time + t.system_time for t in psutil.Process(pid).threads()}


def split_cpu_pct(pid: int, seconds: float) -> tuple[float, float]:
    """(% of a core, of which the main thread's: the event loop) of ``pid`` over ``seconds``."""
    before = thread_seconds(pid)
    started = time.monotonic()
    time.sleep(seconds)
    after = thread_seconds(pid)
    elapsed = time.monotonic() - started
    used = {tid: value - before.get(tid, 0.0) for tid, value in after.items()}
    return sum(used.values()) / elapsed * 100, used.get(pid, 0.0) / elapsed * 100


def relay_case(
    rig: ViewRig, sessions: int, viewers: int, seconds: float, settle: float
) -> tuple[float, float, float]:
    """(relay % of a core, of which the event loop's, Mbit/s per viewer) with ``sessions`` x
    ``viewers`` watching."""
    watching = Viewers(rig)
    try:
        for _ in range(sessions):
            stagger()
            watching.start(rig.session("cpu"), viewers)
        wait_until(watching.all_receiving, 30, "every viewer to receive video")
        time.sleep(settle)
        start_bytes = sum(watching.bytes.values())
        started = time.monotonic()
        pct, loop_pct = split_cpu_pct(rig.relay.pid, seconds)
        mbps = (sum(watching.bytes.values()) - start_bytes) * 8 / 1e6 / (time.monotonic() - started)
        return pct, loop_pct, mbps / (sessions * viewers)
    finally:
        watching.stop()
        rig.wait_no_watches()


def stagger() -> None:
    """Clients of the camera start a moment apart: gst-rtsp-server can abort on an assertion
    (``gst_rtsp_media_get_rates``) when several set up its shared media at the same instant."""
    time.sleep(STAGGER_S)


def ffmpeg_case(
    rig: ViewRig, streams: int, seconds: float, settle: float, *, through_relay: bool = False
) -> tuple[float, float]:
    """(ffmpeg's, the relay's) % of a core per stream, ffmpeg remuxing the camera to fMP4.

    ``through_relay``: ffmpeg reads the camera through a relay route (a tunnel per stream), so
    the relay's share is what carrying a tunnel costs it, without the view.
    """
    url = rig.camera_url("cpu", through_relay=through_relay)
    command = [
        "ffmpeg",
        "-nostdin",
        "-loglevel",
        "error",
        "-rtsp_transport",
        "tcp",
        "-i",
        url,
        "-c",
        "copy",
        "-f",
        "mp4",
        "-movflags",
        "frag_keyframe+empty_moov",
        "pipe:1",
    ]
    processes = []
    for _ in range(streams):
        stagger()
        processes.append(
            subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
    try:
        time.sleep(settle + 2)
        if any(p.poll() is not None for p in processes):
            raise RuntimeError("ffmpeg ended early")
        pids = [p.pid for p in processes]
        before = {pid: cpu_seconds(pid) for pid in [*pids, rig.relay.pid]}
        started = time.monotonic()
        time.sleep(seconds)
        elapsed = time.monotonic() - started
        used = {pid: cpu_seconds(pid) - value for pid, value in before.items()}
        ffmpeg_pct = sum(used[pid] for pid in pids) / elapsed * 100 / streams
        return ffmpeg_pct, used[rig.relay.pid] / elapsed * 100 / streams
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(10)


def first_frames(
    rig: ViewRig, browser: Browser, late: Browser, runs: int
) -> tuple[list[float], list[float]]:
    """Seconds from navigation start to the first frame: new sessions, and a second browser
    joining each while the first plays (it starts from the GOP cache)."""
    fresh: list[float] = []
    joined: list[float] = []
    for _ in range(runs):
        rig.wait_no_watches()
        time.sleep(1.0)  # the camera stops encoding when its last client leaves
        view_url = rig.session("clock")["viewUrl"]
        browser.open(view_url)
        fresh.append(browser.wait(lambda s: s["firstFrameMs"] is not None, 30)["firstFrameMs"])
        browser.wait_playing(1.5)
        late.open(view_url)
        joined.append(late.wait(lambda s: s["firstFrameMs"] is not None, 30)["firstFrameMs"])
        browser.open("about:blank")
        late.open("about:blank")
    return [ms / 1000 for ms in fresh], [ms / 1000 for ms in joined]


def latencies(rig: ViewRig, browser: Browser, seconds: float) -> list[float]:
    rig.wait_no_watches()
    browser.open(rig.session("clock")["viewUrl"])
    browser.wait_playing(2.0)
    browser.run(READ_CLOCK)
    time.sleep(seconds)
    samples = [float(ms) / 1000 for ms in browser.run("return window.latencies")]
    browser.open("about:blank")
    return [s for s in samples if s < 60]  # a misread bit would give nonsense; none seen so far


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.view")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--viewers", type=int, default=8)
    parser.add_argument("--first-frame-runs", type=int, default=5)
    parser.add_argument("--latency-seconds", type=float, default=15.0)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(args.serve))
        return
    import tempfile

    print(f"browser view through the relay; {environment()}")
    folder = Path(tempfile.mkdtemp(prefix="bench-view-"))
    rig = ViewRig(folder)
    try:
        rows = measure_cpu(rig, args)
        browser = Browser(ignore_certificate_errors=True)
        late = Browser(ignore_certificate_errors=True)
        try:
            fresh, joined = first_frames(rig, browser, late, args.first_frame_runs)
            delays = latencies(rig, browser, args.latency_seconds)
        finally:
            browser.close()
            late.close()
    finally:
        rig.close()
    print()
    print(
        table(
            [
                "CPU (% of a core)",
                *[f"round {i + 1}" for i in range(args.rounds)],
                "median",
                "target",
            ],
            rows,
        )
    )
    print()
    print(
        table(
            ["time (s)", "n", "median", "p90", "max", "target"],
            [
                [
                    "link -> first frame, new session",
                    len(fresh),
                    median(fresh),
                    percentile(fresh, 0.9),
                    max(fresh),
                    verdict(max(fresh), TARGET_FIRST_FRAME_S),
                ],
                [
                    "link -> first frame, joining a watched one",
                    len(joined),
                    median(joined),
                    percentile(joined, 0.9),
                    max(joined),
                    "",
                ],
                [
                    "camera -> screen latency",
                    len(delays),
                    median(delays),
                    percentile(delays, 0.9),
                    max(delays),
                    verdict(percentile(delays, 0.9), TARGET_LATENCY_S),
                ],
            ],
        )
    )
    print(
        "CPU: 1080p25 H.264 at 4000 kbit/s, GOP 25; viewers are WebSocket clients in the bench"
        " process. First frame and latency: 640x360 15 fps clock camera, GOP 15, headless"
        " Chromium 1280x1000, software decoding; latency targets apply to p90."
    )


def verdict(value: float, target: float) -> str:
    return f"<= {target:g} {'met' if value <= target else 'MISSED'}"


def measure_cpu(rig: ViewRig, args: argparse.Namespace) -> list[list[object]]:
    sessions, viewers = args.sessions, args.viewers
    results: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        results.setdefault(key, []).append(value)

    for round_index in range(args.rounds):
        idle = cpu_pct([rig.relay.pid], args.seconds)
        _, tunnel = ffmpeg_case(rig, sessions, args.seconds, args.settle, through_relay=True)
        many, many_loop, _ = relay_case(rig, sessions, 1, args.seconds, args.settle)
        ffmpeg_many, _ = ffmpeg_case(rig, sessions, args.seconds, args.settle)
        one, _, mbps = relay_case(rig, 1, 1, args.seconds, args.settle)
        fan, _, _ = relay_case(rig, 1, viewers, args.seconds, args.settle)
        ffmpeg_one, _ = ffmpeg_case(rig, 1, args.seconds, args.settle)
        tunnel -= idle / sessions
        per_session = (many - idle) / sessions
        view_alone = per_session - tunnel
        add("relay idle", idle)
        add("relay, 1 session x 1 viewer", one)
        add(f"relay, {sessions} sessions x 1 viewer", many)
        add(f"relay, 1 session x {viewers} viewers", fan)
        add("relay per watched session", per_session)
        add("  of which outside the event loop (threads)", (many - many_loop) / sessions)
        add("relay per added viewer", (fan - one) / (viewers - 1))
        add("ffmpeg -c copy fMP4, 1 stream", ffmpeg_one)
        add(f"ffmpeg per stream, {sessions} streams", ffmpeg_many)
        add("ratio: relay per session / ffmpeg per stream", per_session / ffmpeg_many)
        add("relay per plain tunnel, ffmpeg as consumer", tunnel)
        add("view alone per session (per session - per tunnel)", view_alone)
        add("ratio: view alone / ffmpeg per stream", view_alone / ffmpeg_many)
        add("Mbit/s a viewer received", mbps)
        print(
            f"  round {round_index + 1}: idle {idle:.2f} %, per session {per_session:.2f} %,"
            f" per plain tunnel {tunnel:.2f} %, view alone {view_alone:.2f} %,"
            f" ffmpeg {ffmpeg_many:.2f} %/stream: ratio {view_alone / ffmpeg_many:.2f}x"
            f" ({verdict(view_alone / ffmpeg_many, TARGET_RATIO)});"
            f" per viewer {(fan - one) / (viewers - 1):.2f} %",
            flush=True,
        )
    rows: list[list[object]] = []
    for key, values in results.items():
        target = ""
        if key.startswith("ratio: view"):
            target = verdict(max(values), TARGET_RATIO) + " (every round)"
        rows.append([key, *values, statistics.median(values), target])
    return rows


if __name__ == "__main__":
    entry_point(main)
