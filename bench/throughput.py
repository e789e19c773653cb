"""Camera-to-cloud bulk throughput: socat (TCP->TCP) vs websocat vs the agent (TCP->WS/WSS).

The "camera" is ``socat -u /dev/zero TCP-LISTEN`` (as fast as the kernel goes); the "cloud" is the
sink process of :mod:`bench.peers` (TCP, ws:// and wss:// listeners counting payload bytes). Each
relay is measured for ``--seconds`` after a warm-up, ``--rounds`` times interleaved; the table shows
medians. Relay CPU is the relay process's user+system time during the window (psutil).

    python -m bench.throughput [--seconds 8] [--warmup 1] [--rounds 3]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.common import (
    LOOPBACK,
    WEBSOCAT,
    Child,
    Rig,
    cpu_seconds,
    entry_point,
    environment,
    median,
    table,
    wait_until,
)
from tests.support.agent import AgentRunner
from tests.support.net import free_port, wait_port

SOCKET_BUFFER = 131072
TARGETS = {"agent ws": 0.8, "agent wss": 0.6}


@dataclass
class Relay:
    name: str
    start: Callable[[], int]  # connects source -> sink, returns the pid doing the relaying
    stop: Callable[[], None]


@dataclass
class Sample:
    mb_s: float
    cpu_s: float
    sink_cpu_s: float
    seconds: float


@dataclass
class Result:
    samples: list[Sample] = field(default_factory=list)

    def med(self, pick: Callable[[Sample], float]) -> float:
        return median([pick(s) for s in self.samples])


class Bench:
    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.sink, ports = rig.sink()
        self.ports: dict[str, int] = ports
        self.source_port = free_port()
        rig.spawn(
            "source",
            [
                "socat",
                "-b",
                str(SOCKET_BUFFER),
                "-u",
                "/dev/zero",
                f"TCP-LISTEN:{self.source_port},bind={LOOPBACK},reuseaddr,fork",
            ],
        )
        wait_port(LOOPBACK, self.source_port)
        self.agent: AgentRunner = rig.agent([self.source_port])
        self.agent_pid = self.agent.process.pid
        self.relay_child: Child | None = None
        self.opened = 0

    def relays(self) -> list[Relay]:
        src = f"{LOOPBACK}:{self.source_port}"
        ws, wss, tcp = self.ports["ws"], self.ports["wss"], self.ports["tcp"]
        buffer = str(SOCKET_BUFFER)
        websocat = [WEBSOCAT, "-q", "-b", "-u", "-B", buffer, f"tcp:{src}"]
        trust = {"SSL_CERT_FILE": str(self.rig.ca.cert_file)}
        return [
            self._process(
                "socat", ["socat", "-b", buffer, "-u", f"TCP:{src}", f"TCP:{LOOPBACK}:{tcp}"]
            ),
            self._process("websocat ws", [*websocat, f"ws://{LOOPBACK}:{ws}/websocat"]),
            self._process("websocat wss", [*websocat, f"wss://{LOOPBACK}:{wss}/websocat"], trust),
            Relay("agent ws", lambda: self._tunnel(f"ws://{LOOPBACK}:{ws}/agent"), self._close),
            Relay("agent wss", lambda: self._tunnel(f"wss://{LOOPBACK}:{wss}/agent"), self._close),
        ]

    def _process(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Relay:
        def start() -> int:
            self.relay_child = self.rig.spawn(name.replace(" ", "-"), args, env=env)
            return self.relay_child.pid

        def stop() -> None:
            if self.relay_child is not None:
                self.relay_child.stop()
                self.rig.children.remove(self.relay_child)
                self.relay_child = None
            self._wait_idle()

        return Relay(name, start, stop)

    def _tunnel(self, url: str) -> int:
        status, body, _ = self.rig.tunnel_open(url, self.source_port)
        if status != 200:
            raise RuntimeError(f"tunnelOpen {url} -> {status} {body}")
        self.opened += 1
        return self.agent_pid

    def _close(self) -> None:
        self.sink.request("close")
        self.agent.wait_event("tunnel.closed", count=self.opened, timeout_s=15)
        self._wait_idle()

    def _wait_idle(self) -> None:
        wait_until(lambda: self.sink.request("stats")["active"] == 0, 15, "the sink to go idle")

    def measure(self, relay: Relay, warmup_s: float, seconds: float) -> Sample:
        before = self.sink.request("stats")["bytes"]
        pid = relay.start()
        try:
            wait_until(
                lambda: self.sink.request("stats")["bytes"] > before, 15, f"{relay.name} data"
            )
            time.sleep(warmup_s)
            b0, c0, s0, t0 = self._probe(pid)
            time.sleep(seconds)
            b1, c1, s1, t1 = self._probe(pid)
        finally:
            relay.stop()
        elapsed = t1 - t0
        return Sample((b1 - b0) / elapsed / 1e6, c1 - c0, s1 - s0, elapsed)

    def _probe(self, pid: int) -> tuple[int, float, float, float]:
        got = self.sink.request("stats")["bytes"]
        return got, cpu_seconds(pid), cpu_seconds(self.sink.pid), time.monotonic()


def report(results: dict[str, Result]) -> str:
    base = results["socat"].med(lambda s: s.mb_s)
    rows = []
    for name, result in results.items():
        mb_s = result.med(lambda s: s.mb_s)
        cpu = result.med(lambda s: s.cpu_s / s.seconds)
        target = TARGETS.get(name)
        ratio = mb_s / base
        verdict = "" if target is None else ("met" if ratio >= target else "MISSED")
        rows.append(
            [
                name,
                mb_s,
                " ".join(f"{s.mb_s:.0f}" for s in result.samples),
                result.med(lambda s: s.cpu_s),
                result.med(lambda s: s.mb_s * s.seconds / s.cpu_s if s.cpu_s else float("nan")),
                cpu * 100,
                result.med(lambda s: s.sink_cpu_s / s.seconds * 100),
                f"{ratio:.2f}x",
                f">= {target}x {verdict}" if target else "",
            ]
        )
    headers = [
        "relay",
        "MB/s",
        "runs MB/s",
        "relay CPU s",
        "MB/CPU-s",
        "relay core%",
        "sink core%",
        "vs socat",
        "target",
    ]
    return table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"throughput, camera -> cloud; {environment()}")
    print(f"{args.rounds} rounds x {args.seconds:g} s after {args.warmup:g} s warm-up; medians")
    with Rig("throughput") as rig:
        bench = Bench(rig)
        relays = bench.relays()
        results = {relay.name: Result() for relay in relays}
        for round_no in range(1, args.rounds + 1):
            for relay in relays:
                sample = bench.measure(relay, args.warmup, args.seconds)
                results[relay.name].samples.append(sample)
                print(
                    f"  round {round_no} {relay.name:<13} {sample.mb_s:8.1f} MB/s"
                    f"  relay CPU {sample.cpu_s:5.2f} s  sink CPU {sample.sink_cpu_s:5.2f} s",
                    flush=True,
                )
    print()
    print(report(results))
    print("MB = 10^6 bytes of payload received by the sink; relay CPU s is per measuring window.")


if __name__ == "__main__":
    entry_point(main)
