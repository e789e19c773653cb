"""Prometheus metrics, read from the live objects at scrape time.

Counters on the byte pump would cost on every chunk; instead a collector reads the tunnels' own
counters (and the totals of closed tunnels) when scraped. Only answers and durations, which happen
once per tunnel, are recorded as they happen (histograms).

Every metric counts one unit (packets, frames, files, bytes, events), so that summing over its
labels means something; the media sources' and tasks' counters are mapped to metrics here.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tunnel_agent import __version__
from tunnel_agent.observability.snapshot import AgentView
from tunnel_agent.tunnel.camera_tunnel import Tunnel

OPEN_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30)
DURATION_SECONDS_BUCKETS = (1, 10, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 24 * 3600)
PREFIX = "tunnel_agent_media_"


@dataclass(frozen=True)
class CounterMetric:
    """Where one media counter goes: a metric (without ``_total``) and, for drops, a reason."""

    name: str
    documentation: str
    reason: str | None = None


SOURCE_COUNTERS = {
    "packets": CounterMetric("source_packets", "Video packets read from the camera"),
    "frames_decoded": CounterMetric("source_decoded_frames", "Frames decoded for snapshots"),
    "images": CounterMetric("source_images", "Images read (folder or HTTP snapshot sources)"),
    "packets_dropped_bad_timestamps": CounterMetric(
        "source_dropped_packets", "Packets the source dropped", reason="bad_timestamps"
    ),
    "reconnects": CounterMetric("source_reconnects", "Reconnections after the source stopped"),
    "watchdog_restarts": CounterMetric(
        "source_watchdog_restarts", "Restarts because no packet came within the watchdog time"
    ),
    "timestamp_resets": CounterMetric(
        "source_timestamp_resets", "Times the source started its clock again"
    ),
    "failures": CounterMetric("source_failures", "Failed requests to an HTTP snapshot URL"),
}
TASK_COUNTERS = {
    "snapshots": CounterMetric("task_snapshots", "Images written or queued for the broker"),
    "clips": CounterMetric("task_clips", "Clip files completed"),
    "packets": CounterMetric("task_packets", "Packets written to clips or sent to a server"),
    "bytes_written": CounterMetric("task_written_bytes", "Bytes of completed files"),
    "connects": CounterMetric("task_connects", "Connections to the media server"),
    "failures": CounterMetric("task_failures", "Times the task failed and backed off"),
    "deleted_by_retention": CounterMetric("task_deleted_files", "Files deleted by retention"),
    "partial_clips_salvaged": CounterMetric(
        "task_salvaged_files", "Clips cut short by a crash, salvaged at start"
    ),
    "partial_files_removed": CounterMetric(
        "task_removed_partial_files", "Files cut short by a crash, removed at start"
    ),
}
# Items a task did not use; packets or frames depending on what the task is fed.
TASK_DROPS = {
    "dropped_queue_full": "queue_full",
    "dropped_while_failed": "while_failed",
    "skipped_until_keyframe": "until_keyframe",
    "skipped_low_disk": "low_disk",
}


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
        ProcessCollector(registry=self.registry)
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
        build = GaugeMetricFamily(
            "tunnel_agent_build_info",
            "The running agent's version (always 1)",
            labels=["version", "python"],
        )
        build.add_metric([__version__, platform.python_version()], 1)
        yield build
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
        if media.cameras:  # else PyAV, which the tasks' module loads, stays unloaded
            yield from self._cameras()
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

    def _cameras(self) -> Iterator[Metric]:
        from tunnel_agent.media.tasks.base import PacketTask, TaskState

        media = self.agent.media
        # Label values without spaces: the states' names, not their display text.
        task_states = [state.name.lower() for state in TaskState]
        up = GaugeMetricFamily(
            f"{PREFIX}source_up", "1 while a camera source delivers", labels=["camera"]
        )
        last_packet = GaugeMetricFamily(
            f"{PREFIX}source_last_packet_timestamp_seconds",
            "Unix time of the source's last usable packet",
            labels=["camera"],
        )
        state = GaugeMetricFamily(
            f"{PREFIX}task_state",
            "1 for each task's current state",
            labels=["camera", "stream", "task", "state"],
        )
        source_counters = _Families("source", SOURCE_COUNTERS.values(), ["camera"])
        task_counters = _Families(
            "task",
            [*TASK_COUNTERS.values(), *(_drops("packets").values()), *(_drops("frames").values())],
            ["camera", "stream", "task"],
        )
        wall_minus_monotonic = time.time() - time.monotonic()
        for camera in media.cameras:
            name = camera.camera.name
            source = camera.source
            if source is not None:
                up.add_metric([name], 1 if source.state.value == "running" else 0)
                if source.last_packet_at is not None:
                    last_packet.add_metric([name], source.last_packet_at + wall_minus_monotonic)
                source_counters.add(SOURCE_COUNTERS, dict(source.counters), [name])
            for task in camera.tasks:
                labels = [name, task.name, task.kind]
                for candidate in task_states:
                    state.add_metric(
                        [*labels, candidate], int(task.state.name.lower() == candidate)
                    )
                unit = "packets" if isinstance(task, PacketTask) else "frames"
                task_counters.add({**TASK_COUNTERS, **_drops(unit)}, dict(task.counters), labels)
        yield from (up, last_packet, state)
        yield from source_counters.families()
        yield from task_counters.families()


def _drops(unit: str) -> dict[str, CounterMetric]:
    return {
        key: CounterMetric(
            f"task_dropped_{unit}", f"{unit.capitalize()} a task did not use", reason
        )
        for key, reason in TASK_DROPS.items()
    }


class _Families:
    """Counter families, one per metric (reasons as a label). A counter not mapped above still
    gets a metric of its own, named after it, so nothing is lost or mixed."""

    def __init__(self, scope: str, known: Iterable[CounterMetric], labels: list[str]) -> None:
        self.scope = scope
        self.labels = labels
        self._families: dict[str, CounterMetricFamily] = {}
        for metric in known:
            self._family(metric)

    def _family(self, metric: CounterMetric) -> CounterMetricFamily:
        family = self._families.get(metric.name)
        if family is None:
            labels = self.labels + (["reason"] if metric.reason is not None else [])
            family = CounterMetricFamily(PREFIX + metric.name, metric.documentation, labels=labels)
            self._families[metric.name] = family
        return family

    def add(
        self, known: Mapping[str, CounterMetric], counters: Mapping[str, int], labels: list[str]
    ) -> None:
        for key, value in counters.items():
            metric = known.get(key) or CounterMetric(f"{self.scope}_{key}", f"{key} counted")
            extra = [metric.reason] if metric.reason is not None else []
            self._family(metric).add_metric([*labels, *extra], value)

    def families(self) -> Iterator[CounterMetricFamily]:
        yield from self._families.values()
