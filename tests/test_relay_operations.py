"""What an operator watches: /metrics following real tunnels, /readyz following the hub, and two
replicas on one devhub, each carrying the video of its own sessions.

Real components as elsewhere: the devhub, a real agent with the synthetic camera, relays on the
shared background loop, PyAV as the consumer. Metrics are read as Prometheus reads them: the text
exposition from ``metrics_listen``, parsed by prometheus-client's own parser.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.camera import RtspCamera
from tests.support.net import free_port, fresh_loopback_ip
from tests.support.relay_bed import (
    AGENT_DEVICE,
    OFFLINE_DEVICE,
    RelayBed,
    create_session,
    start_bed,
    wait_closed,
)
from tests.support.threadloop import ThreadLoop
from tests.support.waiting import until
from tests.test_tunnel_video import decode_frames
from tunnel_agent.cloud.relay.runner import RunningRelay, start_relay

OPTIONS = b"OPTIONS rtsp://camera/test RTSP/1.0\r\nCSeq: 1\r\n\r\n"
StartRelay = Callable[..., RunningRelay]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def bed(
    tmp_path_factory: pytest.TempPathFactory, servers: ThreadLoop, camera: RtspCamera
) -> Iterator[RelayBed]:
    bed = start_bed(tmp_path_factory.mktemp("operations"), servers, {"plain": camera})
    yield bed
    bed.close()


@pytest.fixture
def start(bed: RelayBed) -> Iterator[StartRelay]:
    started: list[RunningRelay] = []

    def start_one(**settings: Any) -> RunningRelay:
        relay = bed.start_relay(**settings)
        started.append(relay)
        return relay

    yield start_one
    for relay in started:
        bed.stop_relay(relay)


async def get(port: int, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}{path}") as response,
    ):
        return response.status, await response.text()


async def scrape(relay: RunningRelay) -> Samples:
    """Every sample of ``/metrics`` by name and labels, parsed as Prometheus parses them."""
    status, text = await get(relay.metrics_port, "/metrics")
    assert status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape_until(
    relay: RunningRelay, ready: Callable[[Samples], bool], timeout_s: float = 15.0
) -> Samples:
    """The first scrape for which ``ready`` holds (a tunnel's bytes can flow before the relay
    has the device's answer to its tunnelOpen)."""
    async with asyncio.timeout(timeout_s):
        while not ready(samples := await scrape(relay)):
            await asyncio.sleep(0.05)
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def route(bed: RelayBed, device: str = AGENT_DEVICE) -> dict[str, Any]:
    port = bed.camera_port() if device == AGENT_DEVICE else 554
    return {
        "listen": f"127.0.0.1:{free_port()}",
        "device_id": device,
        "local_port": port,
        "allowed_sources": ["127.0.0.1/32"],
    }


def route_port(relay: RunningRelay, index: int) -> int:
    return list(relay.relay.routes.values())[index].port


async def test_metrics_follow_real_tunnels(bed: RelayBed, start: StartRelay) -> None:
    relay = start(routes=[route(bed), route(bed, OFFLINE_DEVICE)])
    before = await scrape(relay)
    assert value(before, "tunnel_relay_tunnels_open") == 0
    assert value(before, "tunnel_relay_sessions") == 0

    await create_session(bed, relay)
    reader, writer = await asyncio.open_connection("127.0.0.1", route_port(relay, 0))
    writer.write(OPTIONS)
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)
    results = "tunnel_relay_tunnel_open_results_total"
    opened = await scrape_until(
        relay, lambda m: value(m, "tunnel_relay_tunnel_open_seconds_count") == 1
    )

    assert answer.startswith(b"RTSP/1.0 200 OK")
    assert value(opened, "tunnel_relay_sessions") == 1
    assert value(opened, "tunnel_relay_consumers") == 1
    assert value(opened, "tunnel_relay_tunnels_open") == 1
    assert value(opened, results, hub_status="200", device_status="200") == 1
    assert value(opened, "tunnel_relay_tunnel_open_seconds_count") == 1
    assert value(opened, "tunnel_relay_tunnel_bytes_total", direction="to_device") == len(OPTIONS)
    to_consumer = value(opened, "tunnel_relay_tunnel_bytes_total", direction="to_consumer")
    assert to_consumer >= len(answer)

    # A source the route does not allow, and a device that is not connected.
    refused_reader, refused_writer = await asyncio.open_connection(
        "127.0.0.1", route_port(relay, 0), local_addr=("127.0.0.4", 0)
    )
    assert await wait_closed(refused_reader, 10) == b""
    refused_writer.close()
    offline_reader, offline_writer = await asyncio.open_connection(
        "127.0.0.1", route_port(relay, 1)
    )
    assert await wait_closed(offline_reader, 15) == b""
    offline_writer.close()
    writer.close()
    await until(lambda: not relay.relay.tunnels, timeout_s=15)
    after = await scrape_until(
        relay, lambda m: value(m, "tunnel_relay_tunnel_open_seconds_count") == 2
    )

    assert value(after, "tunnel_relay_refusals_total", reason="source not allowed") == 1
    assert value(after, results, hub_status="404", device_status="none") == 1
    assert value(after, "tunnel_relay_tunnel_open_seconds_count") == 2
    assert value(after, "tunnel_relay_tunnels_open") == 0
    assert value(after, "tunnel_relay_consumers") == 0
    # Closed tunnels keep their bytes in the totals: a counter never goes down.
    assert value(after, "tunnel_relay_tunnel_bytes_total", direction="to_consumer") >= to_consumer
    assert value(after, "tunnel_relay_hub_reachable") == 1


async def test_readyz_follows_the_hub_and_healthz_does_not(
    bed: RelayBed, start: StartRelay
) -> None:
    relay = start()
    await until(lambda: relay.relay.hub.reachable is True, timeout_s=15)
    assert (await get(relay.metrics_port, "/readyz"))[0] == 200

    # The same relay, but the hub's REST API is a port where nothing listens.
    nowhere = f"https://127.0.0.1:{free_port()}"
    settings = bed.settings()
    settings = settings.model_copy(
        update={"iothub": settings.iothub.model_copy(update={"rest_url": nowhere})}
    )
    cut_off = bed.servers.run(start_relay(settings))
    bed.relays.append(cut_off)
    await until(lambda: cut_off.relay.hub.reachable is False, timeout_s=15)

    assert (await get(cut_off.metrics_port, "/readyz"))[0] == 503
    assert (await get(cut_off.metrics_port, "/healthz"))[0] == 200
    samples = await scrape(cut_off)
    assert value(samples, "tunnel_relay_hub_reachable") == 0
    assert value(samples, "tunnel_relay_hub_rest_errors_total", kind="unreachable") >= 1
    bed.stop_relay(cut_off)


async def test_two_replicas_carry_video_each_for_its_own_sessions(
    bed: RelayBed, start: StartRelay
) -> None:
    replicas = [start(), start(host=fresh_loopback_ip())]
    for index, replica in enumerate(replicas):
        host = replica.relay.settings.public_host
        session = await create_session(bed, replica)
        address_host, _, port = session["address"].rpartition(":")
        assert urlsplit(session["connectUrl"]).hostname == host
        assert address_host == host
        carried = [r.relay.totals.bytes_to_consumer for r in replicas]

        sizes = await asyncio.to_thread(decode_frames, f"rtsp://{host}:{port}/test", 5)

        assert sizes == [(640, 360)] * 5
        await until(lambda r=replica: not r.relay.tunnels, timeout_s=15)  # type: ignore[misc]
        other = replicas[1 - index]
        assert replica.relay.totals.bytes_to_consumer > carried[index] + 10_000
        assert other.relay.totals.bytes_to_consumer == carried[1 - index]  # it never saw them
