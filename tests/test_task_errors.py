"""A media task's error goes through the redactor before /status and the twin report it."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

from tunnel_agent.agent import Agent
from tunnel_agent.config.settings import AgentSettings
from tunnel_agent.logs import SECRETS
from tunnel_agent.media.backoff import Backoff
from tunnel_agent.media.packets import CapturedFrame
from tunnel_agent.media.tasks.base import TaskState
from tunnel_agent.media.tasks.snapshot import SnapshotToFs
from tunnel_agent.observability.snapshot import full_status
from tunnel_agent.observability.twin import reported_state
from tunnel_agent.tunnel.user_agent import PlatformInfo

REGISTERED = 'Reg1stered"Secret'
URL_PASSWORD = "Url-Pa55word"


class LeakyFailure(SnapshotToFs):
    """Fails as a library might: its message quoting a URL with a password and a known secret."""

    def handle(self, item: CapturedFrame) -> None:
        raise RuntimeError(
            f"open rtsp://admin:{URL_PASSWORD}@10.0.0.5/s failed; key={REGISTERED}; "
            "GET https://cam/snap.jpg?pwd=QueryValue"
        )


def test_task_errors_are_redacted_in_status_and_twin(tmp_path: Path) -> None:
    settings = AgentSettings(
        cameras=[
            {
                "name": "lobby",
                "url": "rtsp://10.0.0.5/s",
                "streams": [{"name": "snaps", "task": "snapshot-to-fs", "path": "snaps"}],
            }
        ],
        media={"output_root": tmp_path},
        observability={"enabled": False},
    )
    agent = Agent(settings, environ={})
    (camera,) = agent.media.cameras
    original = camera.tasks[0]
    leaky = LeakyFailure("lobby", original.settings, Backoff(1, 2, 60), tmp_path / "snaps")
    camera.tasks[0] = leaky
    SECRETS.add(REGISTERED)
    try:
        leaky.start()
        leaky.on_frame(CapturedFrame(datetime.now(UTC)))
        deadline = time.monotonic() + 10
        while leaky.state is not TaskState.FAILED and time.monotonic() < deadline:
            time.sleep(0.02)
        reason = leaky.reason or ""
        status = json.dumps(full_status(agent))
        twin = json.dumps(reported_state(agent, PlatformInfo.current()))
    finally:
        leaky.stop()
        SECRETS.discard(REGISTERED)
    assert reason.startswith("RuntimeError: open rtsp://admin:***@10.0.0.5/s failed"), reason
    for text in (reason, status, twin):
        assert URL_PASSWORD not in text and "QueryValue" not in text
        assert REGISTERED not in text and json.dumps(REGISTERED)[1:-1] not in text
    assert "key=***" in reason and "snap.jpg?***" in reason
    assert json.loads(twin)["media"][0]["error"] == reason
    assert json.loads(status)["media"]["lobby"]["tasks"]["snaps"]["reason"] == reason
