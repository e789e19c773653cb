"""The check every test gets for free: an agent's ERROR lines, tracebacks and exit code fail it."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from tests.support.agent import AgentRunner, log_problems

NO_HUB: dict[str, object] = {"cameras": []}


def test_error_and_critical_lines_fail_unless_their_event_is_allowed() -> None:
    lines = [
        "2026-01-01T00:00:00.000Z INFO tunnel_agent.tunnel tunnel.opened tunnel=abc",
        "2026-01-01T00:00:00.000Z WARNING tunnel_agent.tunnel tunnel.open_failed status=401",
        "2026-01-01T00:00:00.000Z ERROR tunnel_agent.media media.task_refused stream=s",
        "2026-01-01T00:00:00.000Z CRITICAL asyncio Task exception was never retrieved",
        json.dumps({"ts": "x", "level": "ERROR", "logger": "l", "event": "hub.json_error"}),
    ]
    assert log_problems(lines) == lines[2:]
    assert log_problems(lines, {"media.task_refused"}) == lines[3:]


def test_tracebacks_fail_whole_and_even_in_an_allowed_or_warning_line() -> None:
    printed = [
        "Traceback (most recent call last):",
        '  File "x.py", line 1, in <module>',
        "    boom()",
        "RuntimeError: boom",
        "2026-01-01T00:00:00.000Z INFO tunnel_agent.agent agent.stopped closed_tunnels=0",
    ]
    warning = (
        "2026-01-01T00:00:00.000Z WARNING tunnel_agent.hub hub.connect_failed "
        'error="Traceback (most recent call last):\\n  File ..."'
    )
    assert log_problems(printed) == ["\n".join(printed[:4])]
    assert log_problems([warning], {"hub.connect_failed"}) == [warning]


def test_an_error_in_a_real_agent_log_is_reported_once_and_can_be_allowed(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = f"127.0.0.1:{holder.getsockname()[1]}"
        strict = AgentRunner(tmp_path / "strict", {**NO_HUB, "observability": {"listen": taken}})
        allowed = AgentRunner(
            tmp_path / "allowed",
            {**NO_HUB, "observability": {"listen": taken}},
            expected_errors={"observability.listen_failed"},
        )
        strict.wait_event("observability.listen_failed")
        allowed.wait_event("observability.listen_failed")
        assert strict.stop() == allowed.stop() == 0

    (problem,) = strict.take_problems()
    assert "ERROR" in problem and "observability.listen_failed" in problem
    assert strict.take_problems() == []  # each line is reported once
    assert allowed.take_problems() == []


def test_an_unexpected_exit_code_is_reported_and_a_kill_can_be_declared(tmp_path: Path) -> None:
    wrong = AgentRunner(tmp_path / "wrong", NO_HUB, expected_exit=3)
    killed = AgentRunner(tmp_path / "killed", NO_HUB)
    wrong.wait_event("agent.started")
    killed.wait_event("agent.started")

    assert wrong.stop() == 0
    assert killed.kill() < 0

    assert wrong.take_problems() == [f"{wrong.process.log_file}: agent exited with 0, expected 3"]
    assert killed.take_problems() == []
