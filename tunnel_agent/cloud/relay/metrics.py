"""The relay's Prometheus metrics, read from its live objects when scraped.

Nothing is counted on the byte path: bytes come from the tunnels' own counters (and the totals
of closed ones), refusals from the refusal log, hub errors from the hub client. Only what
happens once per tunnel (its tunnelOpen result and latency) is recorded as it happens.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tunnel_agent.cloud.relay.core import Relay

OPEN_SECONDS_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60)


class RelayMetrics(Collector):
    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.registry = CollectorRegistry(auto_describe=True)
        self.open_results = Counter(
            "tunnel_relay_tunnel_open_results",
            "tunnelOpen calls by the hub's HTTP status and the device's answer status",
            ["hub_status", "device_status"],
            registry=self.registry,
        )
        self.open_seconds = Histogram(
            "tunnel_relay_tunnel_open_seconds",
            "Time from calling tunnelOpen to the device's answer",
            buckets=OPEN_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(self)
        relay.observers.append(self)

    def tunnel_open_result(
        self, hub_status: int, device_status: int | None, seconds: float
    ) -> None:
        device = str(device_status) if device_status is not None else "none"
        self.open_results.labels(str(hub_status), device).inc()
        self.open_seconds.observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        relay = self.relay
        live = list(relay.tunnels.values())
        yield GaugeMetricFamily(
            "tunnel_relay_sessions",
            "Sessions not yet expired or revoked",
            value=len(relay.sessions),
        )
        yield GaugeMetricFamily(
            "tunnel_relay_consumers",
            "Consumer connections admitted (tunnel opening or open)",
            value=len(live),
        )
        yield GaugeMetricFamily(
            "tunnel_relay_tunnels_open",
            "Tunnels carrying bytes",
            value=sum(1 for t in live if t.started and t.close_reason is None),
        )
        carried = CounterMetricFamily(
            "tunnel_relay_tunnel_bytes", "Bytes carried by tunnels", labels=["direction"]
        )
        totals = relay.totals
        carried.add_metric(
            ["to_device"], totals.bytes_to_device + sum(t.bytes_to_device for t in live)
        )
        carried.add_metric(
            ["to_consumer"], totals.bytes_to_consumer + sum(t.bytes_to_consumer for t in live)
        )
        yield carried
        refusals = CounterMetricFamily(
            "tunnel_relay_refusals",
            "Connections and requests refused, by reason",
            labels=["reason"],
        )
        for reason, count in sorted(relay.refusals.counts.items()):
            refusals.add_metric([reason], count)
        yield refusals
        errors = CounterMetricFamily(
            "tunnel_relay_hub_rest_errors", "Failed calls to the hub's REST API", labels=["kind"]
        )
        for kind, count in sorted(relay.hub.errors.items()):
            errors.add_metric([kind], count)
        yield errors
        yield GaugeMetricFamily(
            "tunnel_relay_hub_reachable",
            "1 while the hub's REST API answers",
            value=int(bool(relay.hub.reachable)),
        )
