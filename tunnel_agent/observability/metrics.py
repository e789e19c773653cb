"""Prometheus metrics, read from the live objects at scrape time.

Counters on the byte pump would cost on every chunk; instead a collector reads the tunnels' own
counters (and the totals of closed tunnels) when scraped. Only answers and durations, which happen
once per tunnel, are recorded as they happen (histograms).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tunnel_agent.observability.snapshot import AgentView
from tunnel_agent.tunnel.camera_tunnel import Tunnel

OPEN_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30)
DURATION_SECONDS_BUCKETS = (1, 10, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 24 * 3600)
TASK_STATES = (
    "starting",
    "waiting for the source",
    "running",
    "backing off",
    "paused",
    "failed",
    "stopped",
)


class AgentMetrics(Collector):
    def __init__(self, agent: AgentView) -> None:
        self.agent = agent
        self.registry = CollectorRegistry(auto_describe=True)
        self.open_answers = Counter(
            "tunnel_agent_tunnel_open_answers",
            "tunnelOpen answers by status code",
            ["code"],
            registry=self.registry,
        )
        self.open_seconds = Histogram(
            "tunnel_agent_tunnel_open_seconds",
            "Time from tunnelOpen received to answer",
            buckets=OPEN_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.duration_seconds = Histogram(
            "tunnel_agent_tunnel_duration_seconds",
            "How long tunnels lasted",
            buckets=DURATION_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(self)
        agent.tunnels.observers.append(self)

    # -- TunnelObserver -----------------------------------------------------------------------

    def answered(self, status: int, seconds: float) -> None:
        self.open_answers.labels(str(status)).inc()
        self.open_seconds.observe(seconds)

    def closed(self, tunnel: Tunnel) -> None:
        self.duration_seconds.observe(tunnel.duration_s)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    # -- Collector ------------------------------------------------------------------------------

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield from self._tunnels()
        yield from self._hub()
        yield from self._media()

    def _tunnels(self) -> Iterator[Metric]:
        service = self.agent.tunnels
        live = service.registry.open_tunnels
        yield GaugeMetricFamily("tunnel_agent_tunnels_open", "Open tunnels", value=len(live))
        carried = CounterMetricFamily(
            "tunnel_agent_tunnel_bytes", "Bytes carried by tunnels", labels=["direction"]
        )
        totals = service.totals
        carried.add_metric(
            ["to_remote"], totals.bytes_to_remote + sum(t.bytes_to_remote for t in live)
        )
        carried.add_metric(
            ["to_camera"], totals.bytes_to_camera + sum(t.bytes_to_camera for t in live)
        )
        yield carried

    def _hub(self) -> Iterator[Metric]:
        hub = self.agent.hub
        if hub is None:
            return
        yield GaugeMetricFamily(
            "tunnel_agent_hub_connected", "1 when the IoT Hub link is up", value=int(hub.connected)
        )
        yield CounterMetricFamily(
            "tunnel_agent_hub_reconnects", "Hub connections after the first", value=hub.reconnects
        )

    def _media(self) -> Iterator[Metric]:
        media = self.agent.media
        up = GaugeMetricFamily(
            "tunnel_agent_media_source_up", "1 while a camera source delivers", labels=["camera"]
        )
        age = GaugeMetricFamily(
            "tunnel_agent_media_last_frame_age_seconds",
            "Seconds since the source's last packet",
            labels=["camera"],
        )
        source_events = CounterMetricFamily(
            "tunnel_agent_media_source_events",
            "Source counters (packets, frames, reconnects)",
            labels=["camera", "event"],
        )
        state = GaugeMetricFamily(
            "tunnel_agent_media_task_state",
            "1 for each task's current state",
            labels=["camera", "stream", "task", "state"],
        )
        task_events = CounterMetricFamily(
            "tunnel_agent_media_task_events",
            "Task counters (snapshots, clips, packets, drops, failures)",
            labels=["camera", "stream", "task", "event"],
        )
        for camera in media.cameras:
            name = camera.camera.name
            source = camera.source
            if source is not None:
                status = source.status()
                up.add_metric([name], 1 if status["state"] == "running" else 0)
                if status["last_packet_age_s"] is not None:
                    age.add_metric([name], float(status["last_packet_age_s"]))
                for event, value in source.counters.items():
                    source_events.add_metric([name, event], value)
            for task in camera.tasks:
                for candidate in TASK_STATES:
                    state.add_metric(
                        [name, task.name, task.kind, candidate], int(task.state.value == candidate)
                    )
                for event, value in list(task.counters.items()):
                    task_events.add_metric([name, task.name, task.kind, event], value)
        yield from (up, age, source_events, state, task_events)
        publisher = media.publisher
        if publisher is not None:
            yield GaugeMetricFamily(
                "tunnel_agent_mqtt_connected",
                "1 when the MQTT broker link is up",
                value=int(publisher.connected),
            )
            messages = CounterMetricFamily(
                "tunnel_agent_mqtt_messages", "Snapshot messages by outcome", labels=["outcome"]
            )
            for outcome in ("published", "dropped_queue_full", "dropped_too_large"):
                messages.add_metric([outcome], publisher.counters.get(outcome, 0))
            yield messages
