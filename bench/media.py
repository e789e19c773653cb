"""The media connector next to ffmpeg on a 1080p25 H.264 camera: CPU, RSS and what comes out.

One synthetic camera per GOP (1920x1080, 25 fps, 4000 kbit/s; GOP 25 and GOP 50) and one RECORD
server run for the whole benchmark; mosquitto and a subscriber (paho, in this process) receive the
snapshots. Each configuration gets its own process, alone on its camera: an agent
(``tunnel-agent run``) or ffmpeg. After the process is ready (the agent's task logs
``state=running``; ffmpeg's first segment exists or the RECORD server counts frames) and a short
settle, the process's user+system CPU over the window / wall time and its peak RSS are taken.
Rounds are interleaved (every configuration once, then again) and each figure printed with the mean.

    python -m bench.media [--seconds 20] [--settle 3] [--rounds 2] [--only clip,rtsp,snap,idle]
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil

from bench.common import (
    LOOPBACK,
    Child,
    Rig,
    cpu_seconds,
    entry_point,
    environment,
    table,
    wait_until,
)
from tests.support import toml_writer
from tests.support.agent import AgentRunner, parse_line
from tests.support.camera import CAMERA_SCRIPT, SYSTEM_PYTHON
from tests.support.net import free_port, wait_port

WIDTH, HEIGHT, FPS, KBPS = 1920, 1080, 25, 4000
CLIP_SECONDS = 10
TARGET_SNAPSHOT_PCT = 5.0
SNAPSHOT_REFERENCE = "snap 1/s gop25"  # the case the target is for (keyframes suffice)
STATUS_INTERVAL_S = 5.0  # the agent's media.source_status lines give decoded frames per second
MIB = 2**20


def _tree(pid: int) -> list[psutil.Process]:
    """A process and its descendants: a helper process a task starts counts against its parent."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def tree_cpu_seconds(pid: int) -> float:
    total = 0.0
    for process in _tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def tree_rss_bytes(pid: int) -> int:
    total = 0
    for process in _tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += process.memory_info().rss
    return total


@dataclass(frozen=True)
class Case:
    key: str
    group: str  # idle | clip | rtsp | snap
    tool: str  # agent | ffmpeg
    gop: int = 25
    stream: dict[str, Any] | None = None  # the agent's [[cameras.streams]]; None: no media task


CASES = [
    Case("idle", "idle", "agent"),
    Case(
        "clip agent",
        "clip",
        "agent",
        stream={"task": "clip-to-fs", "format": "mkv", "duration": CLIP_SECONDS},
    ),
    Case("clip ffmpeg", "clip", "ffmpeg"),
    Case("rtsp agent", "rtsp", "agent", stream={"task": "stream-to-rtsp"}),
    Case("rtsp ffmpeg", "rtsp", "ffmpeg"),
    Case(
        "snap 1/s gop25",
        "snap",
        "agent",
        stream={"task": "snapshot-to-mqtt", "format": "jpeg", "snapshots_per_second": 1},
    ),
    Case(
        "snap 0.9/s gop25",
        "snap",
        "agent",
        stream={"task": "snapshot-to-mqtt", "format": "jpeg", "snapshots_per_second": 0.9},
    ),
    Case(
        "snap 1/s gop50",
        "snap",
        "agent",
        gop=50,
        stream={"task": "snapshot-to-mqtt", "format": "jpeg", "snapshots_per_second": 1},
    ),
    Case(
        "snap 2/s gop50",
        "snap",
        "agent",
        gop=50,
        stream={"task": "snapshot-to-mqtt", "format": "jpeg", "snapshots_per_second": 2},
    ),
]


@dataclass
class Result:
    case: Case
    round: int
    seconds: float
    cpu_pct: float
    rss_mib: float  # peak over the window
    camera_pct: float  # the camera (and for rtsp the RECORD server) over the same window
    output: float  # clips: MB/s finished; rtsp: frames/s recorded; snap: messages in the window
    decoded_fps: float | None  # agent: frames decoded per second (media.source_status)
    switches: int | None  # agent: keyframe-only decoding turned on or off, in the window
    notes: str


class Camera:
    """``tunnel_agent/sim/rtsp_camera.py`` in the rig; only encodes while someone plays it."""

    def __init__(self, rig: Rig, name: str, extra: list[str]) -> None:
        self.port = free_port()
        self.child = rig.spawn(
            name,
            [
                SYSTEM_PYTHON,
                str(CAMERA_SCRIPT),
                "--host",
                LOOPBACK,
                "--port",
                str(self.port),
                *extra,
            ],
        )
        wait_until(lambda: "READY" in self.output(), 20, f"{name} to listen")
        self.url = f"rtsp://{LOOPBACK}:{self.port}/test"

    def output(self) -> str:
        return self.child.log.read_text(errors="replace")

    def recorded_frames(self) -> int:
        lines = [line for line in self.output().splitlines() if line.startswith("RECORD ")]
        return int(lines[-1].split()[1]) if lines else 0


class Snapshots:
    """An MQTT 5 subscriber on ``bench/#`` in this process: (arrival, topic, bytes) per message."""

    def __init__(self, port: int) -> None:
        self.received: list[tuple[float, str, int]] = []
        self._subscribed = threading.Event()
        self.client = mqtt.Client(client_id="bench-subscriber", protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda client, *_: client.subscribe("bench/#", qos=1)
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = lambda _c, _u, m: self.received.append(
            (time.monotonic(), m.topic, len(m.payload))
        )
        self.client.connect(LOOPBACK, port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError("the subscriber did not subscribe")

    def count(self, topic: str, start: float, end: float) -> tuple[int, int]:
        hits = [size for at, t, size in self.received if t == topic and start <= at < end]
        return len(hits), sum(hits)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Running:
    """One measured process: its pid, how to tell it is ready, its output, how to stop it."""

    pid: int
    ready: Callable[[], bool]
    stop: Callable[[], None]
    command: str
    config: str = ""
    agent: AgentRunner | None = None
    folder: Path | None = None
    topic: str = ""
    extra_pids: list[int] = field(default_factory=list)


class Bench:
    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        video = ["--width", str(WIDTH), "--height", str(HEIGHT), "--fps", str(FPS)]
        self.cameras = {
            gop: Camera(rig, f"camera-gop{gop}", [*video, "--gop", str(gop), "--kbps", str(KBPS)])
            for gop in (25, 50)
        }
        self.recorder = Camera(rig, "record-server", ["--record-path", "/rec"])
        self.rec_url = f"rtsp://{LOOPBACK}:{self.recorder.port}/rec"
        self.mqtt_port = free_port()
        conf = rig.folder / "mosquitto.conf"
        conf.write_text(f"listener {self.mqtt_port} {LOOPBACK}\nallow_anonymous true\n")
        rig.spawn("mosquitto", ["mosquitto", "-c", str(conf)])
        wait_port(LOOPBACK, self.mqtt_port)
        self.snapshots = Snapshots(self.mqtt_port)

    def close(self) -> None:
        self.snapshots.close()

    def start(self, case: Case, run: int) -> Running:
        folder = self.rig.folder / f"{case.key.replace(' ', '-').replace('/', '')}-{run}"
        camera = self.cameras[case.gop]
        if case.tool == "ffmpeg":
            return self._ffmpeg(case, folder, camera)
        entry: dict[str, Any] = {
            "name": "cam",
            "host": LOOPBACK,
            "ports": [camera.port],
            "url": camera.url,
        }
        config: dict[str, Any] = {"media": {"status_interval": STATUS_INTERVAL_S}}
        topic = ""
        if case.stream is not None:
            stream = {"name": "bench", **case.stream}
            if case.group == "clip":
                stream["path"] = str(folder / "clips")
            elif case.group == "rtsp":
                stream |= {
                    "media_server_address": LOOPBACK,
                    "media_server_port": self.recorder.port,
                    "media_server_path": "rec",
                }
            elif case.group == "snap":
                topic = stream["topic"] = f"bench/{folder.name}"
                config["mqtt"] = {"url": f"mqtt://{LOOPBACK}:{self.mqtt_port}"}
            entry["streams"] = [stream]
        config["cameras"] = [entry]
        agent = AgentRunner(folder, config)
        self.rig.agents.append(agent)

        def ready() -> bool:
            if agent.process.process.poll() is not None:
                raise RuntimeError(f"the agent exited; see {agent.process.log_file}")
            if case.stream is None:
                return bool(agent.events("agent.started"))
            return any(e.get("state") == "running" for e in agent.events("media.task_state"))

        def stop() -> None:
            agent.stop()
            self.rig.agents.remove(agent)

        return Running(
            agent.process.pid,
            ready,
            stop,
            shlex.join(agent.process.args),
            toml_writer.dumps(config),
            agent=agent,
            folder=folder / "clips",
            topic=topic,
        )

    def _ffmpeg(self, case: Case, folder: Path, camera: Camera) -> Running:
        folder.mkdir(parents=True)
        head = ["ffmpeg", "-nostdin", "-nostats", "-loglevel", "warning"]
        source = ["-rtsp_transport", "tcp", "-i", camera.url, "-c", "copy"]
        if case.group == "clip":
            out = ["-f", "segment", "-segment_time", str(CLIP_SECONDS), "-reset_timestamps", "1"]
            args = [*head, *source, *out, str(folder / "out%03d.mkv")]
        else:
            args = [*head, *source, "-f", "rtsp", "-rtsp_transport", "tcp", self.rec_url]
        child: Child = self.rig.spawn(folder.name, args)
        frames = self.recorder.recorded_frames()

        def ready() -> bool:
            if child.process.poll() is not None:
                raise RuntimeError(f"ffmpeg exited; see {child.log}")
            if case.group == "clip":
                return (folder / "out000.mkv").exists()
            return self.recorder.recorded_frames() > frames

        def stop() -> None:
            child.stop()
            self.rig.children.remove(child)

        return Running(child.pid, ready, stop, shlex.join(args), folder=folder)

    def measure(
        self, case: Case, run: int, seconds: float, settle: float
    ) -> tuple[Result, Running]:
        running = self.start(case, run)
        try:
            wait_until(running.ready, 60, f"{case.key} to run")
            time.sleep(settle)
            cams = [self.cameras[case.gop].child.pid]
            if case.group == "rtsp":
                cams.append(self.recorder.child.pid)
            before = self._output(case, running)
            c0, k0, t0, w0 = (
                tree_cpu_seconds(running.pid),
                sum(cpu_seconds(p) for p in cams),
                time.monotonic(),
                time.time(),
            )
            peak = tree_rss_bytes(running.pid)
            while time.monotonic() < t0 + seconds:
                time.sleep(min(0.5, max(0.0, t0 + seconds - time.monotonic())))
                peak = max(peak, tree_rss_bytes(running.pid))
            c1, k1, t1, w1 = (
                tree_cpu_seconds(running.pid),
                sum(cpu_seconds(p) for p in cams),
                time.monotonic(),
                time.time(),
            )
            after = self._output(case, running)
            elapsed = t1 - t0
            if case.group == "snap":
                count, size = self.snapshots.count(running.topic, t0, t1)
                output = float(count)
                notes = f"{size / max(count, 1) / 1024:.0f} KiB each"
            else:
                output = (after - before) / elapsed
                notes = ""
            decoded, switches = None, None
            if running.agent is not None:
                decoded, switches, found = agent_stats(running.agent, w0, w1)
                if case.group != "snap":
                    decoded = switches = None
                notes = "; ".join(n for n in (notes, found) if n)
        finally:
            running.stop()
        return (
            Result(
                case,
                run,
                elapsed,
                (c1 - c0) / elapsed * 100,
                peak / MIB,
                (k1 - k0) / elapsed * 100,
                output,
                decoded,
                switches,
                notes,
            ),
            running,
        )

    def _output(self, case: Case, running: Running) -> float:
        """Clips: MB in finished files; rtsp: frames the RECORD server decoded."""
        if case.group == "rtsp":
            return float(self.recorder.recorded_frames())
        if case.group == "clip" and running.folder is not None and running.folder.exists():
            files = sorted(p for p in running.folder.iterdir() if not p.name.startswith("."))
            if case.tool == "ffmpeg":
                files = files[:-1]  # the segment being written
            return sum(p.stat().st_size for p in files) / 1e6
        return 0.0


def agent_stats(agent: AgentRunner, start: float, end: float) -> tuple[float | None, int, str]:
    """Frames decoded per second and keyframe-only switches in the window; what it dropped."""
    statuses: list[tuple[float, dict[str, Any]]] = []
    policy: list[str] = []
    dropped: dict[str, int] = {}
    for line in agent.output().splitlines():
        event = parse_line(line)
        if event is None:
            continue
        at = datetime.fromisoformat(line.split(" ", 1)[0].replace("Z", "+00:00")).timestamp()
        if event["event"] == "media.source_status" and start <= at <= end:
            statuses.append((at, event))
        if event["event"] == "media.decode_policy" and start <= at <= end:
            policy.append(str(event["keyframes_only"]))
        for key, value in event.items():
            if key.startswith(("packets_dropped", "dropped")):
                dropped[key] = int(value)
    decoded = None
    if len(statuses) >= 2 and "frames_decoded" in statuses[-1][1]:
        (a, first), (b, last) = statuses[0], statuses[-1]
        decoded = (int(last["frames_decoded"]) - int(first.get("frames_decoded", 0))) / (b - a)
    notes = [f"keyframes_only {'>'.join(policy)}"] if policy else []
    notes += [f"{key}={value}" for key, value in dropped.items() if value]
    return decoded, len(policy), ", ".join(notes)


def summary(results: list[Result]) -> tuple[list[str], list[list[object]]]:
    headers = [
        "configuration",
        "tool",
        "core% runs",
        "core% mean",
        "RSS MiB runs",
        "RSS mean",
        "output (mean)",
        "decoded/s",
        "kf-only switches",
        "camera core%",
        "target / comparison",
    ]
    by_case: dict[str, list[Result]] = {}
    for result in results:
        by_case.setdefault(result.case.key, []).append(result)
    means = {key: statistics.fmean(r.cpu_pct for r in rs) for key, rs in by_case.items()}
    rows: list[list[object]] = []
    for key, runs in by_case.items():
        case = runs[0].case
        cpu = means[key]
        out = statistics.fmean(r.output for r in runs)
        output = {
            "clip": f"{out:.2f} MB/s in clips",
            "rtsp": f"{out:.1f} frames/s recorded",
            "snap": f"{out:.1f} msgs / {runs[0].seconds:.0f} s",
        }.get(case.group, "-")
        target = ""
        ffmpeg = means.get(f"{case.group} ffmpeg")
        if case.tool == "agent" and ffmpeg:
            target = f"{cpu / ffmpeg:.2f}x ffmpeg"
            if case.group in ("clip", "rtsp"):
                target = f"agent <= ffmpeg: {'met' if cpu <= ffmpeg else 'MISSED'} ({target})"
        elif key == SNAPSHOT_REFERENCE:
            verdict = "met" if cpu < TARGET_SNAPSHOT_PCT else "MISSED"
            target = f"< {TARGET_SNAPSHOT_PCT:g} % per camera: {verdict}"
        elif case.group == "snap" and means.get(SNAPSHOT_REFERENCE):
            target = f"{cpu / means[SNAPSHOT_REFERENCE]:.1f}x {SNAPSHOT_REFERENCE}"
        elif case.group == "idle":
            target = "reference"
        rows.append(
            [
                key,
                case.tool,
                " / ".join(f"{r.cpu_pct:.2f}" for r in runs),
                cpu,
                " / ".join(f"{r.rss_mib:.0f}" for r in runs),
                statistics.fmean(r.rss_mib for r in runs),
                output,
                " / ".join("-" if r.decoded_fps is None else f"{r.decoded_fps:.1f}" for r in runs),
                " / ".join("-" if r.switches is None else str(r.switches) for r in runs),
                statistics.fmean(r.camera_pct for r in runs),
                target,
            ]
        )
    return headers, rows


def compact_toml(text: str) -> list[str]:
    """One line per TOML table: ``[table] key = value, key = value``."""
    lines: list[str] = []
    fresh = False  # the last line is a table header without keys yet
    for line in filter(None, (raw.strip() for raw in text.splitlines())):
        if line.startswith("[") or not lines:
            lines.append(line)
            fresh = True
        else:
            lines[-1] += (" " if fresh else ", ") + line
            fresh = False
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.media")
    parser.add_argument("--seconds", type=float, default=20.0, help="measurement window")
    parser.add_argument("--settle", type=float, default=3.0, help="wait after ready")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", default="idle,clip,rtsp,snap", help="groups to run")
    args = parser.parse_args()
    groups = args.only.split(",")
    cases = [c for c in CASES if c.group in groups]
    print(f"media connector vs ffmpeg, {WIDTH}x{HEIGHT} {FPS} fps H.264 {KBPS} kbit/s")
    print(environment())
    print(
        f"window {args.seconds:g} s after ready + {args.settle:g} s; {args.rounds} interleaved"
        " rounds; one process per configuration, alone on its camera"
    )
    results: list[Result] = []
    used: dict[str, Running] = {}
    with Rig("media", hub=False) as rig:
        bench = Bench(rig)
        try:
            for run in range(1, args.rounds + 1):
                for case in cases:
                    result, running = bench.measure(case, run, args.seconds, args.settle)
                    results.append(result)
                    used.setdefault(case.key, running)
                    print(
                        f"  round {run} {case.key:16} {case.tool:6} {result.cpu_pct:6.2f} % core"
                        f"  RSS {result.rss_mib:5.0f} MiB  output {result.output:6.2f}"
                        f"  camera {result.camera_pct:5.1f} %  {result.notes}",
                        flush=True,
                    )
        finally:
            bench.close()
    print()
    print(table(*summary(results)))
    print(
        "core% = user+system CPU of the agent or ffmpeg process over the window / wall time (100 ="
        " one core); RSS = peak over the window; camera core% = the camera encoding 1080p25 (plus"
        " the RECORD server decoding what it receives, for rtsp), for context only. Clip output is"
        " MB/s in finished files (segment boundaries make it jumpy); rtsp output is what the"
        " RECORD server decoded; snap output counts messages the subscriber received in the"
        " window. decoded/s and kf-only switches come from the agent's log (media.source_status,"
        " media.decode_policy) in the window. GOP 25 at 25 fps is 1 keyframe/s: at 1 snapshot/s"
        " keyframes just suffice, at 0.9/s with margin; GOP 50 (0.5 keyframe/s) needs full"
        " decoding."
    )
    print("\ncommands and configurations (first round; paths are in the scratch folder):")
    for key, running in used.items():
        print(f"- {key}: {running.command}")
        for line in compact_toml(running.config):
            print(f"    {line}")


if __name__ == "__main__":
    entry_point(main)
