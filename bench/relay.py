"""The whole path, camera -> agent -> relay -> consumer, against two chained socat in the same run.

Processes: the "camera" is ``socat -b 131072 -u /dev/zero TCP-LISTEN`` (the blaster); a real
``tunnel-agent run`` and a real ``tunnel-agent relay`` (wss://, a route for the blaster, a session
for ``tunnel-agent connect``) on the devhub; the consumer is the sink of :mod:`bench.peers`, which
connects and counts what it receives. Each consumer connection costs one ``tunnelOpen`` through
the hub, as in production.

Bulk throughput, ``--rounds`` interleaved rounds of ``--seconds`` after ``--warmup``, medians:

* ``2x socat``: blaster -> socat -> socat -> sink (each socat ``-b 131072``), the baseline;
* ``relay``: blaster -> agent -> wss -> relay route -> sink;
* ``connect``: blaster -> agent -> relay -> wss -> ``tunnel-agent connect`` -> sink.

MB per CPU-second of the relay and of the agent are both taken on the same bytes in the same
window (psutil user+system of each process). Then 50 paced tunnels of 4 Mbit/s (20 000 B every
40 ms) through a route: relay and agent % of a core per tunnel, relay RSS per tunnel; then
``--idle`` open idle tunnels: relay and agent RSS before and with them. Each of those is measured
``--repeats`` times, each time in a fresh relay process (a relay that ran bulk rounds holds freed
heap that new tunnels reuse, which made the growth per tunnel swing from 21 to 103 KiB), with RSS
taken at steps and its slope per tunnel printed.

    python -m bench.relay [--seconds 8] [--warmup 1] [--rounds 3] [--paced 50] [--idle 1000]
                          [--paced-seconds 15] [--repeats 3]

``--rounds 0``, ``--paced 0`` or ``--idle 0`` leave that part out.
"""

from __future__ import annotations

import argparse
import json
import secrets
import ssl
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil  # type: ignore[import-untyped]

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
from tests.support.net import free_port
from tests.support.toml_writer import dumps

SOCKET_BUFFER = 131072
SOCAT = ["socat", "-b", str(SOCKET_BUFFER)]
LISTEN_OPTIONS = f"bind={LOOPBACK},reuseaddr"
API_KEY = secrets.token_urlsafe(24)
TARGET_VS_SOCAT = 0.8
TARGET_CPU_VS_AGENT = 0.9
TARGET_RSS_KIB = 64
CHUNK_BYTES = 20_000
INTERVAL_S = 0.04
CONNECT_BATCH = 50


@dataclass
class Sample:
    mb_s: float
    relay_cpu_s: float
    agent_cpu_s: float
    connect_cpu_s: float
    seconds: float

    @property
    def megabytes(self) -> float:
        return self.mb_s * self.seconds


@dataclass
class Path:
    name: str
    start: Callable[[], None]  # starts the flow into the sink
    stop: Callable[[], None]
    samples: list[Sample] = field(default_factory=list)

    def med(self, pick: Callable[[Sample], float]) -> float:
        return median([pick(s) for s in self.samples])


class Bench:
    def __init__(self, rig: Rig, max_tunnels: int) -> None:
        self.rig = rig
        self.blaster_port = free_port()
        rig.spawn(
            "blaster",
            [*SOCAT, "-u", "/dev/zero", f"TCP-LISTEN:{self.blaster_port},{LISTEN_OPTIONS},fork"],
        )
        wait_listening(self.blaster_port)
        self.sink, _ = rig.sink()
        _, paced = rig.peer(
            "paced", "source", "--chunk", str(CHUNK_BYTES), "--interval", str(INTERVAL_S)
        )
        _, idle = rig.peer("idle", "source", "--chunk", "0")
        self.camera_ports = {
            "blaster": self.blaster_port,
            "paced": paced["tcp"],
            "idle": idle["tcp"],
        }
        self.agent = rig.agent(
            list(self.camera_ports.values()), max_tunnels=min(4096, max_tunnels + 8)
        )
        self.relay_port = free_port()
        self.route_ports = {name: free_port() for name in self.camera_ports}
        self.max_tunnels = max_tunnels
        self.relay = self._start_relay(max_tunnels)
        self.connect_port = free_port()
        self.connect: Child | None = None
        self.connect_pid = 0
        self.opened = 0

    # -- processes ----------------------------------------------------------------------------

    def _start_relay(self, max_tunnels: int) -> Child:
        pair = self.rig.cert("relay")
        many = max_tunnels + 64
        routes = [
            {
                "listen": f"{LOOPBACK}:{port}",
                "device_id": "bench",
                "local_port": self.camera_ports[name],
            }
            for name, port in self.route_ports.items()
        ]
        config = {
            "relay": {
                "listen": f"{LOOPBACK}:{self.relay_port}",
                "public_url": f"wss://{LOOPBACK}:{self.relay_port}",
                "metrics_listen": f"{LOOPBACK}:{free_port()}",
                "cert_file": str(pair.cert_file),
                "key_file": str(pair.key_file),
                "api_key": API_KEY,
                "max_tunnels": many,
                "max_tunnels_per_device": many,
                "max_connections_per_source": many,
                "new_connections_burst": many,
                "new_connections_per_second": 1000.0,
                "max_handshakes_per_source": 1000,
                "max_connections": max(1024, 4 * many),
            },
            "iothub": {
                "service_connection_string": self.rig.hub.devhub.service_connection_string,
                "ca_file": str(self.rig.ca.cert_file),
            },
            "routes": routes,
        }
        path = self.rig.folder / "relay.toml"
        path.write_text(dumps(config))
        relay = self.rig.spawn("relay", [sys.executable, "-m", "tunnel_agent", "relay", "-c", path])
        for port in [self.relay_port, *self.route_ports.values()]:
            wait_listening(port)
        return relay

    def start_connect(self) -> None:
        """``tunnel-agent connect`` on a fresh session of the blaster's port (checked at start)."""
        answer = self._api(
            "POST", "/v1/sessions", {"deviceId": "bench", "localPort": self.blaster_port}
        )
        token_file = self.rig.folder / "session.token"
        token_file.write_text(answer["token"])
        token_file.chmod(0o600)
        args = [sys.executable, "-m", "tunnel_agent", "connect", answer["connectUrl"]]
        args += ["--listen", f"{LOOPBACK}:{self.connect_port}", "--ca-file", self.rig.ca.cert_file]
        args += ["--token-file", token_file]
        self.connect = self.rig.spawn("connect", args)
        self.connect_pid = self.connect.pid
        wait_listening(self.connect_port)

    def _api(self, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            f"https://{LOOPBACK}:{self.relay_port}{path}",
            data=json.dumps(body).encode(),
            method=method,
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        )
        tls = ssl.create_default_context(cafile=str(self.rig.ca.cert_file))
        with urllib.request.urlopen(request, context=tls, timeout=15) as response:
            return json.loads(response.read())  # type: ignore[no-any-return]

    # -- bulk paths ---------------------------------------------------------------------------

    def paths(self) -> list[Path]:
        return [
            Path("2x socat", self._socat_chain, self._stop_socat),
            Path("relay", lambda: self._consume(self.route_ports["blaster"]), self._close),
            Path("connect", lambda: self._consume(self.connect_port), self._close),
        ]

    def _socat_chain(self) -> None:
        near, far = free_port(), free_port()  # sink -> near -> far -> blaster
        self._socats = [
            self.rig.spawn(
                "socat-far",
                [
                    *SOCAT,
                    "-U",
                    f"TCP-LISTEN:{far},{LISTEN_OPTIONS}",
                    f"TCP:{LOOPBACK}:{self.blaster_port}",
                ],
            ),
            self.rig.spawn(
                "socat-near",
                [*SOCAT, "-U", f"TCP-LISTEN:{near},{LISTEN_OPTIONS}", f"TCP:{LOOPBACK}:{far}"],
            ),
        ]
        wait_listening(near)
        wait_listening(far)
        self._sink_connect(near, 1)

    def _stop_socat(self) -> None:
        for child in self._socats:
            child.stop()
            self.rig.children.remove(child)
        self._wait_idle()

    def _consume(self, port: int, count: int = 1) -> None:
        for start in range(0, count, CONNECT_BATCH):
            self._sink_connect(port, min(CONNECT_BATCH, count - start))
        self.opened += count

    def _sink_connect(self, port: int, count: int) -> None:
        answer = self.sink.request(f"connect {LOOPBACK} {port} {count}")
        if answer.get("connected") != count:
            raise RuntimeError(f"the sink made {answer} of {count} connections to {port}")
        wait_until(lambda: self.sink.request("stats")["active"] >= count, 30, f"{count} consumers")

    def _close(self) -> None:
        self.sink.request("close")
        self.agent.wait_event("tunnel.closed", count=self.opened, timeout_s=60)
        self._wait_idle()

    def _wait_idle(self) -> None:
        wait_until(lambda: self.sink.request("stats")["active"] == 0, 30, "the sink to go idle")

    def measure(self, path: Path, warmup_s: float, seconds: float) -> Sample:
        before = self.sink.request("stats")["bytes"]
        path.start()
        try:
            wait_until(
                lambda: self.sink.request("stats")["bytes"] > before, 30, f"{path.name} data"
            )
            time.sleep(warmup_s)
            first = self._probe()
            time.sleep(seconds)
            last = self._probe()
        finally:
            path.stop()
        elapsed = last[-1] - first[-1]
        got, relay, agent, connect = (b - a for a, b in zip(first[:-1], last[:-1], strict=True))
        return Sample(got / elapsed / 1e6, relay, agent, connect, elapsed)

    def _probe(self) -> tuple[float, float, float, float, float]:
        got = self.sink.request("stats")["bytes"]
        connect = cpu_seconds(self.connect_pid) if self.connect_pid else 0.0
        return (
            got,
            cpu_seconds(self.relay.pid),
            cpu_seconds(self.agent.process.pid),
            connect,
            time.monotonic(),
        )

    # -- many tunnels -------------------------------------------------------------------------

    def restart_relay(self) -> None:
        """A fresh relay process: its heap holds nothing freed by earlier rounds that tunnels could
        reuse (which would make their growth look smaller than a new relay's)."""
        self.relay.stop()
        self.rig.children.remove(self.relay)
        self.relay = self._start_relay(self.max_tunnels)

    def many(self, route: str, count: int, seconds: float, settle_s: float) -> dict[str, Any]:
        """Open ``count`` tunnels through a route in steps, RSS at each; CPU % over ``seconds``.

        RSS per tunnel is the least-squares slope of the relay's RSS over the steps from a tenth
        of the tunnels to all of them (the first tunnels carry one-off costs such as the hub
        client's connections); the growth from no tunnel to all is printed beside it."""
        steps = rss_steps(count)
        relay_before, agent_before = rss_bytes(self.relay.pid), rss_bytes(self.agent.process.pid)
        points: list[tuple[float, float]] = []
        open_now = 0
        for step in steps:
            self._consume(self.route_ports[route], step - open_now)
            open_now = step
            self.agent.wait_event("tunnel.opened", count=self.opened, timeout_s=120)
            time.sleep(settle_s)  # every tunnel past its first bytes
            points.append((float(step), float(rss_bytes(self.relay.pid))))
        bytes0, relay0, agent0 = self._counts()
        started = time.monotonic()
        time.sleep(seconds)
        bytes1, relay1, agent1 = self._counts()
        elapsed = time.monotonic() - started
        relay_rss = rss_bytes(self.relay.pid)
        figures: dict[str, Any] = {
            "tunnels": float(self.sink.request("stats")["active"]),
            "relay_pct": (relay1 - relay0) / elapsed * 100,
            "agent_pct": (agent1 - agent0) / elapsed * 100,
            "mbit": (bytes1 - bytes0) * 8 / elapsed / 1e6,
            "slope": slope(points),
            "from_none": (points[-1][1] - relay_before) / count,
            "steps": points,
            "agent_rss": float(rss_bytes(self.agent.process.pid) - agent_before) / count,
            "relay_rss_total": float(relay_rss),
            "hub_connections": float(self._hub_connections()),
        }
        self._close()
        return figures

    def _hub_connections(self) -> int:
        """The relay's open connections to the hub's REST API (its client's pool)."""
        port = int(self.rig.hub.devhub.hub_name.rsplit(":", 1)[1])
        connections = psutil.Process(self.relay.pid).net_connections("tcp")
        return sum(1 for c in connections if c.raddr and c.raddr.port == port)

    def _counts(self) -> tuple[int, float, float]:
        got = self.sink.request("stats")["bytes"]
        return got, cpu_seconds(self.relay.pid), cpu_seconds(self.agent.process.pid)


def rss_steps(count: int) -> list[int]:
    """Tunnel counts to sample RSS at: a tenth of ``count``, then five even steps to all of it."""
    first = max(1, count // 10)
    return sorted({first, *(round(count * k / 5) for k in range(1, 6))} - {0})


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x (bytes per tunnel)."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if spread == 0:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread


def wait_listening(port: int, timeout_s: float = 30.0) -> None:
    """Until something listens on the port: a test connection would open a tunnel (or use up
    a one-shot socat)."""

    def listening() -> bool:
        return any(
            c.status == psutil.CONN_LISTEN and c.laddr.port == port
            for c in psutil.net_connections("tcp")
        )

    wait_until(listening, timeout_s, f"a listener on port {port}")


def bulk_report(paths: list[Path]) -> str:
    base = paths[0].med(lambda s: s.mb_s)
    rows = []
    for path in paths:
        mb_s = path.med(lambda s: s.mb_s)
        row: list[object] = [path.name, mb_s, " ".join(f"{s.mb_s:.0f}" for s in path.samples)]
        if path.name == "2x socat":
            rows.append([*row, "1.00x", "", "", "", "", ""])
            continue
        relay = path.med(lambda s: s.megabytes / s.relay_cpu_s)
        agent = path.med(lambda s: s.megabytes / s.agent_cpu_s)
        ratio = mb_s / base
        worst = min(s.mb_s for s in path.samples) / base
        cpu_ratio = path.med(lambda s: s.agent_cpu_s / s.relay_cpu_s)
        verdict = "met" if worst >= TARGET_VS_SOCAT else "MISSED"
        cpu_verdict = "met" if cpu_ratio >= TARGET_CPU_VS_AGENT else "MISSED"
        rows.append(
            [
                *row,
                f"{ratio:.2f}x (worst {worst:.2f}x) {verdict}",
                relay,
                agent,
                f"{cpu_ratio:.2f}x {cpu_verdict}",
                path.med(lambda s: s.relay_cpu_s / s.seconds * 100),
                path.med(lambda s: s.connect_cpu_s / s.seconds * 100)
                if path.name == "connect"
                else "",
            ]
        )
    headers = [
        "path",
        "MB/s",
        "runs MB/s",
        f"vs 2x socat (>= {TARGET_VS_SOCAT}x)",
        "relay MB/CPU-s",
        "agent MB/CPU-s",
        f"relay/agent (>= {TARGET_CPU_VS_AGENT}x)",
        "relay core%",
        "connect core%",
    ]
    return table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.relay")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--paced", type=int, default=50)
    parser.add_argument("--paced-seconds", type=float, default=15.0)
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"relay, camera -> agent -> relay -> consumer; {environment()}")
    print(f"{args.rounds} rounds x {args.seconds:g} s after {args.warmup:g} s warm-up; medians")
    with Rig("relay") as rig:
        bench = Bench(rig, max(args.paced, args.idle))
        if args.rounds:
            bulk(bench, args.rounds, args.warmup, args.seconds)
        report_many(
            bench, args.paced, args.paced_seconds, args.idle, args.repeats, restart=args.rounds > 0
        )


def bulk(bench: Bench, rounds: int, warmup_s: float, seconds: float) -> None:
    bench.start_connect()
    paths = bench.paths()
    for round_no in range(1, rounds + 1):
        for path in paths:
            sample = bench.measure(path, warmup_s, seconds)
            path.samples.append(sample)
            print(
                f"  round {round_no} {path.name:<9} {sample.mb_s:8.1f} MB/s  relay CPU"
                f" {sample.relay_cpu_s:5.2f} s  agent CPU {sample.agent_cpu_s:5.2f} s",
                flush=True,
            )
    print()
    print(bulk_report(paths))
    print("MB = 10^6 bytes the consumer received; MB/CPU-s on the same bytes in the same window.")
    print()
    assert bench.connect is not None
    bench.connect.stop()
    bench.rig.children.remove(bench.connect)
    bench.connect_pid = 0


def report_many(
    bench: Bench, paced: int, seconds: float, idle: int, repeats: int, restart: bool
) -> None:
    """Each repetition in a fresh relay process (``restart``: after bulk rounds, always)."""
    if paced:
        runs = []
        for repeat in range(repeats):
            if restart or repeat:
                bench.restart_relay()
            runs.append(bench.many("paced", paced, seconds, settle_s=2.0))
            print_steps(f"paced {repeat + 1}", runs[-1])
        headers = [
            "4 Mbit/s",
            "tunnels",
            "Mbit/s got",
            "relay core%",
            "agent core%",
            "relay %/tunnel",
            "agent %/tunnel",
            "relay/agent CPU (<= 1x)",
            f"relay RSS KiB/tunnel, slope (<= {TARGET_RSS_KIB})",
            "from none",
            "relay-hub conns",
        ]
        rows = []
        for index, f in enumerate(runs, 1):
            n = f["tunnels"]
            rows.append(
                [
                    f"run {index}",
                    n,
                    f["mbit"],
                    f["relay_pct"],
                    f["agent_pct"],
                    f["relay_pct"] / n,
                    f["agent_pct"] / n,
                    f"{f['relay_pct'] / f['agent_pct']:.2f}x",
                    f["slope"] / 1024,
                    f["from_none"] / 1024,
                    f["hub_connections"],
                ]
            )
        worst = max(f["slope"] for f in runs) / 1024
        cpu = median([f["relay_pct"] / f["agent_pct"] for f in runs])
        print(table(headers, rows))
        verdict = "met" if worst <= TARGET_RSS_KIB else "MISSED"
        cpu_verdict = "met" if cpu <= 1.0 else "MISSED"
        print(
            f"paced: RSS per tunnel worst {worst:.1f} KiB ({verdict}), median"
            f" {median([f['slope'] for f in runs]) / 1024:.1f}; relay/agent CPU median"
            f" {cpu:.2f}x ({cpu_verdict})"
        )
        print()
    if idle:
        runs = []
        for repeat in range(repeats):
            if restart or paced or repeat:
                bench.restart_relay()
            runs.append(bench.many("idle", idle, 2.0, settle_s=1.0))
            print_steps(f"idle {repeat + 1}", runs[-1])
        headers = [
            "idle",
            "tunnels",
            "relay RSS MiB",
            f"relay RSS KiB/tunnel, slope (<= {TARGET_RSS_KIB})",
            "from none",
            "agent RSS KiB/tunnel",
        ]
        rows = [
            [
                f"run {index}",
                f["tunnels"],
                f["relay_rss_total"] / 2**20,
                f["slope"] / 1024,
                f["from_none"] / 1024,
                f["agent_rss"] / 1024,
            ]
            for index, f in enumerate(runs, 1)
        ]
        print(table(headers, rows))
        worst = max(f["slope"] for f in runs) / 1024
        verdict = "met" if worst <= TARGET_RSS_KIB else "MISSED"
        print(f"idle: RSS per tunnel worst {worst:.1f} KiB ({verdict})")
    print(
        "RSS per tunnel: least-squares slope of the relay's RSS over the steps from a tenth of"
        " the tunnels to all, each run in a fresh relay process; 'from none': growth from no"
        " tunnel to all, per tunnel (one-off costs included)."
    )


def print_steps(name: str, figures: dict[str, Any]) -> None:
    steps = "  ".join(f"{int(n)}: {rss / 2**20:.2f}" for n, rss in figures["steps"])
    print(f"  {name}: relay RSS MiB at tunnels {steps}", flush=True)


if __name__ == "__main__":
    entry_point(main)
