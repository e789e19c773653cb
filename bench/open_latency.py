"""tunnelOpen answer latency through the hub, as the service sees it and as the agent logs it.

The service side invokes tunnelOpen ``--count`` times in a row (after a few warm-up calls) and times
each call from the MQTT publish to the answer. The camera is a :mod:`bench.peers` source that only
holds connections; the endpoint is the sink, which closes each WebSocket right after accepting it
(path ``/close/...``), so every tunnel ends by itself and the agent never nears ``max_tunnels``.
The agent's own figure is ``took_ms`` of its ``tunnel.opened`` lines (request parsed -> both ends
connected), so the difference is the hub round trip (mosquitto + the IoT SDK on both sides).

    python -m bench.open_latency [--count 200] [--schemes wss,ws]
"""

from __future__ import annotations

import argparse
import time

from bench.common import LOOPBACK, Rig, entry_point, environment, percentile, table, wait_until

TARGET_P99_MS = 150.0
WARMUP_CALLS = 3


def stats(name: str, values: list[float], target: float | None = None) -> list[object]:
    p99 = percentile(values, 0.99)
    verdict = "" if target is None else f"<= {target:g} {'met' if p99 <= target else 'MISSED'}"
    return [
        name,
        len(values),
        percentile(values, 0.5),
        percentile(values, 0.9),
        p99,
        max(values),
        sum(values) / len(values),
        verdict,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.open_latency")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--schemes", default="wss,ws")
    parser.add_argument("--gap", type=float, default=0.01, help="seconds between calls")
    args = parser.parse_args()
    print(f"tunnelOpen latency through the hub; {environment()}")
    rows: list[list[object]] = []
    with Rig("latency") as rig:
        sink, sink_ports = rig.sink()
        _, source_ports = rig.peer("camera", "source", "--chunk", "0")
        port = int(source_ports["tcp"])
        agent = rig.agent([port], max_tunnels=64)
        for scheme in args.schemes.split(","):
            url = f"{scheme}://{LOOPBACK}:{sink_ports[scheme]}/close"
            service_ms: list[float] = []
            ids: list[str] = []
            warmup: list[float] = []
            for call in range(WARMUP_CALLS + args.count):
                status, body, ms = rig.tunnel_open(f"{url}/{scheme}{call}", port)
                if status != 200:
                    raise RuntimeError(f"tunnelOpen -> {status} {body}")
                if call < WARMUP_CALLS:
                    warmup.append(ms)
                else:
                    service_ms.append(ms)
                    ids.append(body["tunnelId"])
                time.sleep(args.gap)
            wait_until(lambda: sink.request("stats")["active"] == 0, 15, "tunnels to close")
            opened = {e["tunnel"]: float(e["took_ms"]) for e in agent.events("tunnel.opened")}
            agent_ms = [opened[i] for i in ids]
            hub_ms = [s - a for s, a in zip(service_ms, agent_ms, strict=True)]
            print(f"  {scheme}: warm-up calls {', '.join(f'{m:.1f}' for m in warmup)} ms")
            rows += [
                stats(f"{scheme} service invoke->answer", service_ms, TARGET_P99_MS),
                stats(f"{scheme} agent took_ms", agent_ms),
                stats(f"{scheme} difference (hub path)", hub_ms),
            ]
    print()
    print(table(["measure (ms)", "n", "p50", "p90", "p99", "max", "mean", "p99 target"], rows))
    print("difference = service time - agent took_ms, per call: MQTT + SDK both ways.")


if __name__ == "__main__":
    entry_point(main)
