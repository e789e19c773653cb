"""The agent's footprint on a gateway: RSS and start-up time, beside the least Python can do.

Three agent configurations, each a fresh ``tunnel-agent run`` connected to the local hub (TLS
mosquitto on loopback, as in the other benches) with the observability endpoint on (the default):

* ``tunnels only``: one camera with its RTSP port for tunnels, no media stream;
* ``+ 1 snapshot``: the same camera with one snapshot-to-mqtt task (JPEG, 1/s);
* ``all task types``: snapshot-to-mqtt, snapshot-to-fs, clip-to-fs, stream-to-rtsp and
  stream-to-rtsps on that camera.

The camera is the synthetic 1080p25 H.264 camera of ``bench.media`` (4000 kbit/s, a keyframe a
second); the RTSP(S) RECORD servers and mosquitto run for the whole benchmark. Baselines in the
same run: the bare interpreter (``python -c`` printing one line) and azure-iot-device's client
alone connected to the same hub (:mod:`bench.sdk_device`), which is what any Python IoT Plug and
Play device costs before it does anything.

Start-up is process start (just before ``Popen``) to the agent's ``hub.connected`` log line (its
timestamp) or the baseline's "connected" line. RSS is sampled every 0.5 s over the window once
every task runs (after ``--settle`` seconds); the median is reported, and VmHWM (the lifetime peak,
start-up included). Rounds are interleaved; the table gives medians over them.

    python -m bench.footprint [--rounds 3] [--seconds 10] [--settle 5] [--only tunnels,snapshot,all]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.common import (
    LOOPBACK,
    Child,
    Rig,
    cpu_seconds,
    entry_point,
    environment,
    median,
    rss_bytes,
    table,
    wait_until,
)
from bench.media import FPS, HEIGHT, KBPS, WIDTH, Camera
from tests.support.agent import AgentRunner, parse_line
from tests.support.net import free_port, wait_port

MIB = 2**20
TARGET_MIB = {"tunnels": 40.0, "snapshot": 60.0}
SAMPLE_EVERY_S = 0.5


@dataclass(frozen=True)
class Config:
    key: str
    label: str
    streams: tuple[str, ...]  # task types, one stream each


CONFIGS = [
    Config("tunnels", "tunnels only", ()),
    Config("snapshot", "+ 1 snapshot", ("snapshot-to-mqtt",)),
    Config(
        "all",
        "all task types",
        ("snapshot-to-mqtt", "snapshot-to-fs", "clip-to-fs", "stream-to-rtsp", "stream-to-rtsps"),
    ),
]


@dataclass
class Sample:
    what: str
    round: int
    startup_s: float
    rss_mib: float  # median over the window
    peak_mib: float  # VmHWM: the lifetime peak
    cpu_pct: float
    imported: str  # heavy modules the running agent has loaded (from /status)


def vm_hwm_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def log_time(line: str) -> float:
    return datetime.fromisoformat(line.split(" ", 1)[0].replace("Z", "+00:00")).timestamp()


class Bench:
    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        video = ["--width", str(WIDTH), "--height", str(HEIGHT), "--fps", str(FPS)]
        self.camera = Camera(rig, "camera", [*video, "--gop", str(FPS), "--kbps", str(KBPS)])
        self.recorder = Camera(rig, "record-server", ["--record-path", "/rec"])
        pair = rig.cert("record-tls")
        bundle = rig.folder / "record-tls.pem"
        bundle.write_text(pair.cert_file.read_text() + pair.key_file.read_text())
        self.tls_recorder = Camera(
            rig, "record-server-tls", ["--record-path", "/rec", "--tls-cert", str(bundle)]
        )
        self.mqtt_port = free_port()
        conf = rig.folder / "mosquitto.conf"
        conf.write_text(f"listener {self.mqtt_port} {LOOPBACK}\nallow_anonymous true\n")
        rig.spawn("mosquitto", ["mosquitto", "-c", str(conf)])
        wait_port(LOOPBACK, self.mqtt_port)

    def stream(self, task: str, folder: Path) -> dict[str, Any]:
        stream: dict[str, Any] = {"name": task.replace("-", "_"), "task": task}
        if task == "snapshot-to-mqtt":
            stream |= {"format": "jpeg", "snapshots_per_second": 1, "topic": "bench/footprint"}
        elif task == "snapshot-to-fs":
            stream |= {"format": "jpeg", "snapshots_per_second": 1, "path": str(folder / "snaps")}
        elif task == "clip-to-fs":
            stream |= {"format": "mkv", "duration": 10, "path": str(folder / "clips")}
        else:
            server = self.tls_recorder if task == "stream-to-rtsps" else self.recorder
            stream |= {
                "media_server_address": LOOPBACK,
                "media_server_port": server.port,
                "media_server_path": "rec",
            }
            if task == "stream-to-rtsps":
                stream["media_server_ca_file"] = str(self.rig.ca.cert_file)
        return stream

    def agent(self, config: Config, run: int, seconds: float, settle: float) -> Sample:
        folder = self.rig.folder / f"{config.key}-{run}"
        camera: dict[str, Any] = {
            "name": "cam",
            "host": LOOPBACK,
            "ports": [self.camera.port],
            "url": self.camera.url,
            "streams": [self.stream(task, folder) for task in config.streams],
        }
        settings: dict[str, Any] = {
            "hub": self.rig.hub.hub_config(),
            "tunnel": {"ca_file": str(self.rig.ca.cert_file)},
            "cameras": [camera],
        }
        if "snapshot-to-mqtt" in config.streams:
            settings["mqtt"] = {"url": f"mqtt://{LOOPBACK}:{self.mqtt_port}"}
        started = time.time()
        agent = AgentRunner(folder, settings)
        self.rig.agents.append(agent)
        try:
            agent.wait_connected()
            connected = next(
                log_time(line)
                for line in agent.output().splitlines()
                if (event := parse_line(line)) and event["event"] == "hub.connected"
            )
            names = {stream["name"] for stream in camera["streams"]}
            wait_until(lambda: running_streams(agent) >= names, 60, f"{config.label} to run")
            time.sleep(settle)
            pid = agent.process.pid
            rss, cpu_pct = window(pid, seconds)
            return Sample(
                config.label,
                run,
                connected - started,
                median(rss) / MIB,
                vm_hwm_bytes(pid) / MIB,
                cpu_pct,
                imported_modules(agent),
            )
        finally:
            agent.stop()
            self.rig.agents.remove(agent)
            self.rig.hub.wait_device_gone()

    def baseline(self, what: str, run: int, seconds: float, settle: float) -> Sample:
        if what == "python":
            args = [
                sys.executable,
                "-c",
                "import json, sys, time; print(json.dumps({'connected_at': time.time()}),"
                " flush=True); sys.stdin.read()",
            ]
        else:
            hub = self.rig.hub
            args = [
                sys.executable,
                "-m",
                "bench.sdk_device",
                hub.connection_string,
                str(self.rig.ca.cert_file),
            ]
        started = time.time()
        child: Child = self.rig.spawn(f"{what}-{run}", args, control=True)
        try:
            connected = float(child.read_json(30)["connected_at"])
            time.sleep(settle)
            rss, cpu_pct = window(child.pid, seconds)
            return Sample(
                what,
                run,
                connected - started,
                median(rss) / MIB,
                vm_hwm_bytes(child.pid) / MIB,
                cpu_pct,
                "",
            )
        finally:
            child.stop()
            self.rig.children.remove(child)
            if what != "python":
                self.rig.hub.wait_device_gone()


def running_streams(agent: AgentRunner) -> set[str]:
    return {
        str(event["stream"])
        for event in agent.events("media.task_state")
        if event.get("state") == "running"
    }


def imported_modules(agent: AgentRunner) -> str:
    """What the agent's /status says it has loaded of the heavy, optional libraries."""
    from urllib.request import urlopen

    with urlopen(f"{agent.observability_url}/status", timeout=5) as answer:
        status = json.load(answer)
    loaded = status.get("process", {}).get("libraries_loaded")
    if loaded is None:
        return "?"
    return ",".join(name for name, on in loaded.items() if on) or "-"


def window(pid: int, seconds: float) -> tuple[list[int], float]:
    """RSS samples and % of a core over ``seconds``."""
    samples: list[int] = []
    c0, t0 = cpu_seconds(pid), time.monotonic()
    while time.monotonic() < t0 + seconds:
        samples.append(rss_bytes(pid))
        time.sleep(SAMPLE_EVERY_S)
    return samples, (cpu_seconds(pid) - c0) / (time.monotonic() - t0) * 100


def summary(samples: list[Sample], keys: dict[str, str]) -> list[list[object]]:
    by: dict[str, list[Sample]] = {}
    for sample in samples:
        by.setdefault(sample.what, []).append(sample)
    sdk = by.get("azure-iot-device", [])
    sdk_rss = median([s.rss_mib for s in sdk])
    sdk_start = median([s.startup_s for s in sdk])
    rows: list[list[object]] = []
    for what, runs in by.items():
        rss = median([s.rss_mib for s in runs])
        start = median([s.startup_s for s in runs])
        target = TARGET_MIB.get(keys.get(what, ""))
        verdict = (
            "-" if target is None else f"<= {target:g}: {'met' if rss <= target else 'MISSED'}"
        )
        is_agent = what in keys
        rows.append(
            [
                what,
                " / ".join(f"{s.rss_mib:.1f}" for s in runs),
                rss,
                f"+{rss - sdk_rss:.1f}" if is_agent and sdk else "-",
                median([s.peak_mib for s in runs]),
                verdict,
                " / ".join(f"{s.startup_s:.2f}" for s in runs),
                start,
                f"+{start - sdk_start:.2f}" if is_agent and sdk else "-",
                median([s.cpu_pct for s in runs]),
                runs[-1].imported or "-",
            ]
        )
    return rows


HEADERS = [
    "process",
    "RSS MiB runs",
    "RSS median",
    "vs SDK alone",
    "peak (VmHWM)",
    "RSS target",
    "start-up s runs",
    "start-up median",
    "vs SDK alone",
    "core%",
    "loaded (from /status)",
]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.footprint")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="RSS sampling window")
    parser.add_argument("--settle", type=float, default=5.0, help="wait once every task runs")
    parser.add_argument("--only", default="tunnels,snapshot,all", help="agent configurations")
    args = parser.parse_args()
    configs = [c for c in CONFIGS if c.key in args.only.split(",")]
    print(f"agent footprint; {environment()}")
    print(
        f"{args.rounds} interleaved rounds; RSS median of {SAMPLE_EVERY_S:g} s samples over"
        f" {args.seconds:g} s after every task runs + {args.settle:g} s; camera {WIDTH}x{HEIGHT}"
        f" {FPS} fps H.264 {KBPS} kbit/s, a keyframe a second"
    )
    samples: list[Sample] = []
    keys = {c.label: c.key for c in configs}
    with Rig("footprint") as rig:
        bench = Bench(rig)
        jobs: list[Callable[[int], Sample]] = [
            lambda run: bench.baseline("python", run, args.seconds, args.settle),
            lambda run: bench.baseline("azure-iot-device", run, args.seconds, args.settle),
            *[
                (lambda run, c=c: bench.agent(c, run, args.seconds, args.settle))  # type: ignore[misc]
                for c in configs
            ],
        ]
        for run in range(1, args.rounds + 1):
            for job in jobs:
                sample = job(run)
                samples.append(sample)
                print(
                    f"  round {run} {sample.what:16} start-up {sample.startup_s:5.2f} s"
                    f"  RSS {sample.rss_mib:5.1f} MiB (peak {sample.peak_mib:5.1f})"
                    f"  {sample.cpu_pct:5.2f} % core  {sample.imported}",
                    flush=True,
                )
    print()
    print(table(HEADERS, summary(samples, keys)))
    print(
        "python = the bare interpreter printing one line; azure-iot-device = its client alone,"
        " connected to the same hub with the agent's options (bench/sdk_device.py). start-up ="
        " process start to hub connected. 'vs SDK alone' is what the agent adds to the least a"
        " Python IoT Plug and Play device costs. RSS targets: tunnels only <= 40 MiB, one snapshot"
        " task <= 60 MiB."
    )


if __name__ == "__main__":
    entry_point(main)
