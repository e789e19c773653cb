"""Many camera-like tunnels through one agent: CPU and memory per 4 Mbit/s tunnel.

The "cameras" are one :mod:`bench.peers` source process writing 20 000 bytes every 40 ms to each
connection (4 Mbit/s, like 25 fps video); the "cloud" is the sink process. One agent opens 1, then
10, then 50 tunnels (tunnelOpen through the hub); after a warm-up at each step, the agent's CPU
(psutil user+system over the window / wall time) and its RSS growth since before the first tunnel
are divided by the number of tunnels. Each scheme (wss://, ws://) gets a fresh agent.

    python -m bench.paced_tunnels [--steps 1,10,50] [--seconds 20] [--schemes wss,ws]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from bench.common import (
    LOOPBACK,
    Rig,
    cpu_seconds,
    entry_point,
    environment,
    rss_bytes,
    table,
    wait_until,
)
from tests.support.agent import AgentRunner

CHUNK_BYTES = 20_000
INTERVAL_S = 0.04
MBIT_PER_TUNNEL = CHUNK_BYTES * 8 / INTERVAL_S / 1e6
TARGET_CPU_PCT = 0.35
TARGET_RSS_KIB = 64


@dataclass
class Step:
    scheme: str
    tunnels: int
    seconds: float
    cpu_pct: float  # agent, % of one core
    idle_cpu_pct: float
    rss_growth: int  # bytes since before the first tunnel
    sink_mbit: float  # aggregate received
    slowest_mbit: float  # the slowest tunnel's rate
    sink_cpu_pct: float

    def row(self, previous: Step | None) -> list[object]:
        n = self.tunnels
        before_n, before_rss = (previous.tunnels, previous.rss_growth) if previous else (0, 0)
        marginal = (self.rss_growth - before_rss) / max(1, n - before_n) / 1024
        cpu_each = self.cpu_pct / n
        rss_each = self.rss_growth / n / 1024
        return [
            self.scheme,
            n,
            self.cpu_pct,
            cpu_each,
            (self.cpu_pct - self.idle_cpu_pct) / n,
            "met" if cpu_each <= TARGET_CPU_PCT else "MISSED",
            self.rss_growth / 1024 / 1024,
            rss_each,
            marginal,
            "met" if rss_each <= TARGET_RSS_KIB else "MISSED",
            self.sink_mbit,
            self.sink_mbit / n,
            self.slowest_mbit,
            self.sink_cpu_pct,
        ]


HEADERS = [
    "scheme",
    "tunnels",
    "agent core%",
    "core%/tunnel",
    "net of idle",
    "cpu target",
    "RSS +MiB",
    "KiB/tunnel",
    "marginal KiB",
    "rss target",
    "sink Mbit/s",
    "Mbit/s/tunnel",
    "slowest",
    "sink core%",
]


def run_scheme(
    rig: Rig, scheme: str, steps: list[int], seconds: float, warmup: float
) -> list[Step]:
    sink, sink_ports = rig.sink()
    source, source_ports = rig.peer(
        f"source-{scheme}", "source", "--chunk", str(CHUNK_BYTES), "--interval", str(INTERVAL_S)
    )
    port = int(source_ports["tcp"])
    agent: AgentRunner = rig.agent([port], max_tunnels=max(steps) + 8)
    pid = agent.process.pid
    time.sleep(warmup)
    rss0 = rss_bytes(pid)
    c0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(min(5.0, seconds))
    idle_pct = (cpu_seconds(pid) - c0) / (time.monotonic() - t0) * 100
    print(f"  {scheme}: idle agent {idle_pct:.2f} % of a core, RSS {rss0 / 2**20:.1f} MiB")
    url = f"{scheme}://{LOOPBACK}:{sink_ports[scheme]}/paced"
    results: list[Step] = []
    opened = 0
    for count in steps:
        while opened < count:
            status, body, _ = rig.tunnel_open(f"{url}/{opened}", port)
            if status != 200:
                raise RuntimeError(f"tunnelOpen -> {status} {body}")
            opened += 1
        wait_until(lambda: sink.request("stats")["active"] == opened, 15, "all tunnels")  # noqa: B023
        time.sleep(warmup)
        window = seconds if count == max(steps) else seconds / 2
        before, c0, s0, t0 = (
            sink.request("stats"),
            cpu_seconds(pid),
            cpu_seconds(sink.pid),
            time.monotonic(),
        )
        time.sleep(window)
        after, c1, s1, t1 = (
            sink.request("stats"),
            cpu_seconds(pid),
            cpu_seconds(sink.pid),
            time.monotonic(),
        )
        elapsed = t1 - t0
        rates = [
            (b - a) * 8 / elapsed / 1e6
            for a, b in zip(before["per_conn"], after["per_conn"], strict=True)
        ]
        step = Step(
            scheme,
            count,
            elapsed,
            (c1 - c0) / elapsed * 100,
            idle_pct,
            rss_bytes(pid) - rss0,
            sum(rates),
            min(rates),
            (s1 - s0) / elapsed * 100,
        )
        results.append(step)
        print(
            f"  {scheme} {count:3d} tunnels: agent {step.cpu_pct:5.1f} % core,"
            f" RSS +{step.rss_growth / 1024:.0f} KiB, sink {step.sink_mbit:.1f} Mbit/s",
            flush=True,
        )
    for child in (sink, source):  # this agent's tunnels end with them; the next scheme starts clean
        child.stop()
        rig.children.remove(child)
    agent.stop()
    rig.agents.remove(agent)
    rig.hub.wait_device_gone()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.paced_tunnels")
    parser.add_argument("--steps", default="1,10,50", help="tunnel counts, ascending")
    parser.add_argument("--seconds", type=float, default=20.0, help="window at the last step")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--schemes", default="wss,ws")
    args = parser.parse_args()
    steps = sorted(int(s) for s in args.steps.split(","))
    print(f"paced tunnels, {MBIT_PER_TUNNEL:g} Mbit/s each, camera -> cloud; {environment()}")
    print(
        f"window {args.seconds:g} s at {steps[-1]} tunnels, {args.seconds / 2:g} s below;"
        f" warm-up {args.warmup:g} s"
    )
    results: list[Step] = []
    with Rig("paced") as rig:
        for scheme in args.schemes.split(","):
            results += run_scheme(rig, scheme, steps, args.seconds, args.warmup)
    print()
    rows = [
        step.row(prev if prev is not None and prev.scheme == step.scheme else None)
        for prev, step in zip([None, *results], results, strict=False)
    ]
    print(table(HEADERS, rows))
    print(
        f"targets per {MBIT_PER_TUNNEL:g} Mbit/s tunnel: <= {TARGET_CPU_PCT} % of a core,"
        f" <= {TARGET_RSS_KIB} KiB RSS. 'net of idle' subtracts the agent's CPU with no tunnel;"
        " RSS growth is measured from before the first tunnel; 'marginal KiB' is the growth"
        " since the previous step per added tunnel (leaves out one-time costs)."
    )


if __name__ == "__main__":
    entry_point(main)
