"""Opening a re-stream to a media server that accepts the connection and never answers must not
stop the rest of the agent, and stopping the agent meanwhile must not wait for the open."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.camera import RtspCamera
from tests.support.waiting import until
from tests.test_media import restream_agent
from tests.test_observability import get

OPEN_TIMEOUT_S = 60.0  # how long FFmpeg would wait for each answer of the handshake
ANSWER_BOUND_S = 3.0  # the agent's loop answers within this while the open hangs
STOP_BOUND_S = 12.0  # the agent exits within this while the open hangs


class SilentMediaServer:
    """Accepts TCP connections, holds them open, and never sends or reads a byte."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, name="silent-server", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:  # closed
                return
            self.accepted.append(connection)

    def close(self) -> None:
        self._listener.close()
        for connection in self.accepted:
            connection.close()
        self._thread.join(5)


def timed_get(url: str) -> tuple[int, str, float]:
    started = time.monotonic()
    code, body = get(url)
    return code, body, time.monotonic() - started


@pytest.mark.timeout(120)
async def test_a_silent_media_server_freezes_neither_the_agent_nor_its_shutdown(
    tmp_path: Path, camera: RtspCamera
) -> None:
    server = SilentMediaServer()
    agent = restream_agent(
        tmp_path / "agent", camera, server.port, "silent", open_timeout=OPEN_TIMEOUT_S
    )
    try:
        # The re-stream is opening: its TCP connection to the server is up, unanswered.
        await until(lambda: server.accepted, timeout_s=30)
        code, body, took_s = await asyncio.to_thread(timed_get, f"{agent.observability_url}/status")
        assert code == 200 and took_s < ANSWER_BOUND_S, took_s
        status: dict[str, Any] = json.loads(body)
        task = status["media"]["lobby"]["tasks"]["out"]
        assert task["state"] != "failed" and not task.get("connects")
        # A second request, well after the first: the loop keeps serving, not only once.
        code, _, took_s = await asyncio.to_thread(timed_get, f"{agent.observability_url}/status")
        assert code == 200 and took_s < ANSWER_BOUND_S, took_s
        assert not [e for e in agent.events("media.task_state") if e.get("state") == "failed"]

        started = time.monotonic()
        exit_code = await asyncio.to_thread(agent.stop)
        stopped_in_s = time.monotonic() - started
    finally:
        agent.stop()
        server.close()
    assert exit_code == 0
    assert stopped_in_s < STOP_BOUND_S, stopped_in_s
