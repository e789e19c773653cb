"""The supervised hub link: backoff between failed connects, deadlines on SDK calls, rebuilding."""

from __future__ import annotations

import base64
import secrets
import socket
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent import AgentRunner
from tests.support.hub import HubHarness
from tests.support.net import fresh_loopback_ip
from tests.support.threadloop import ThreadLoop
from tunnel_agent.cloud.devhub.certs import LocalCA

BACKOFF_INITIAL_S = 1.0  # the link's first backoff cap (not configurable)
HUB_PORT = 8883  # the SDK's MQTT port, fixed


def seconds(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["ts"].replace("Z", "+00:00")).timestamp()


def hub_at(host: str, ca: LocalCA, **extra: Any) -> dict[str, Any]:
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    return {
        "connection_string": f"HostName={host};DeviceId=nobody;SharedAccessKey={key}",
        "ca_file": str(ca.cert_file),
        **extra,
    }


@pytest.fixture
def silent_hub() -> Iterator[str]:
    """A hub address that accepts TCP and then never says a word (a hung TLS handshake)."""
    host = fresh_loopback_ip()
    with socket.socket() as listener:
        listener.bind((host, HUB_PORT))
        listener.listen(16)  # never accepted: the kernel completes handshakes, nobody answers
        yield host


def test_failed_connects_back_off_exponentially_with_jitter_up_to_backoff_max(
    tmp_path: Path, ca: LocalCA
) -> None:
    backoff_max_s = 4.0
    agent = AgentRunner(
        tmp_path,
        {"hub": hub_at(fresh_loopback_ip(), ca, backoff_max=backoff_max_s), "cameras": []},
    )  # nothing listens there: every connect is refused at once
    failures = agent.wait_event("hub.connect_failed", count=8, timeout_s=90)[:8]
    attempts = agent.events("hub.connecting")
    agent.stop()

    waits = [float(f["retry_in_s"]) for f in failures]
    for number, (failure, wait) in enumerate(zip(failures, waits, strict=True), start=1):
        assert int(failure["attempt"]) == number
        assert 0 <= wait <= min(backoff_max_s, BACKOFF_INITIAL_S * 2 ** (number - 1)) + 0.05
    assert max(waits[2:]) > BACKOFF_INITIAL_S  # the cap grew (all six under 1 s: p = 0.25**6)
    assert len(set(waits)) > 1  # jittered, not a fixed interval
    for failure, wait, next_attempt in zip(failures, waits, attempts[1:], strict=False):
        assert seconds(next_attempt) - seconds(failure) >= wait - 0.1  # the wait was real


def test_every_sdk_call_has_a_deadline(tmp_path: Path, ca: LocalCA, silent_hub: str) -> None:
    timeout_s = 2.0
    agent = AgentRunner(
        tmp_path,
        {"hub": hub_at(silent_hub, ca, operation_timeout=timeout_s, keep_alive=5), "cameras": []},
    )
    failures = agent.wait_event("hub.connect_failed", count=4, timeout_s=60)
    attempts = agent.events("hub.connecting")

    assert [f["error"] for f in failures[:2]] == ["timeout", "timeout"]
    for attempt, failure in zip(attempts, failures[:2], strict=False):
        took = seconds(failure) - seconds(attempt)
        assert timeout_s - 0.1 <= took < timeout_s + 5
    # The first handshake gave up after keep_alive (5 s), long after its call was abandoned:
    # that late failure is one warning, not an unretrieved-exception error. It comes when the
    # SDK's thread gets to it, which on a loaded machine can be after the fourth failure.
    assert agent.wait_event("hub.abandoned_call_failed", timeout_s=30)
    assert agent.stop() == 0  # a hung SDK call does not hold the shutdown either


async def test_a_link_down_longer_than_reconnect_after_is_rebuilt(
    tmp_path: Path, ca: LocalCA, servers: ThreadLoop
) -> None:
    own_hub = HubHarness(tmp_path, ca, servers, device_id="rebuild-cam")
    # The SDK's own retries are far apart, so only the rebuild can bring the link back in time.
    agent = AgentRunner(
        tmp_path / "agent",
        {
            "hub": {
                **own_hub.hub_config(),
                "retry_interval": 600,
                "reconnect_after": 2,
                "backoff_max": 2,
            },
            "cameras": [],
        },
    )
    try:
        agent.wait_connected()
        own_hub.wait_device()
        servers.run(own_hub.broker.stop())
        rebuilding = agent.wait_event("hub.rebuilding_client")[0]
        servers.run(own_hub.broker.start())
        agent.wait_event("hub.connected", count=2, timeout_s=40)
        own_hub.wait_device()

        status, body = await own_hub.tunnel_open("wss://relay.example.net/t", "token", 9)
        assert (status, body["target"]) == (400, "localhost:9")
        assert float(rebuilding["down_s"]) >= 2
        names = [e["event"] for e in agent.events() if e["event"].startswith("hub.")]
        rebuilt = names.index("hub.rebuilding_client")
        assert "hub.disconnected" in names[:rebuilt]
        assert names[rebuilt:].count("hub.connecting") >= 1
        assert agent.events("hub.connected")[-1]["reconnects"] == "1"
    finally:
        agent.stop()
        own_hub.stop()
