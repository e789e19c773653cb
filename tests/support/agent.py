"""The agent as users run it: ``tunnel-agent run --config FILE`` in a child process.

Every runner is also checked: its log must hold no ERROR (or CRITICAL) line and no traceback, and
it must exit with the code the test expects (0 unless told otherwise). ``tests/conftest.py`` runs
the check after each test; its docstring says how a test allows the errors it provokes.
"""

from __future__ import annotations

import json
import re
import signal
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

from tests.support import toml_writer
from tests.support.net import free_port
from tests.support.processes import ManagedProcess

_EVENT = re.compile(r"^(?P<ts>\S+) (?P<level>[A-Z]+) (?P<logger>\S+) (?P<event>\S+)(?P<fields>.*)$")
_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')
ERROR_LEVELS = frozenset({"ERROR", "CRITICAL"})
TRACEBACK = "Traceback (most recent call last)"
KILLED = -signal.SIGKILL
AGENT_STOP_WAIT_S = 25.0  # the agent's shutdown_timeout (20 s by default) and a margin


def parse_line(line: str) -> dict[str, Any] | None:
    """An event line (text or JSON format) as a dict with ``event``, ``level`` and its fields."""
    if line.startswith("{"):
        try:
            document = json.loads(line)
        except ValueError:
            return None
        return document if isinstance(document, dict) and "event" in document else None
    match = _EVENT.match(line)
    if match is None:
        return None
    fields: dict[str, Any] = {
        "ts": match["ts"],
        "event": match["event"],
        "level": match["level"],
        "logger": match["logger"],
    }
    for key, raw in _FIELD.findall(match["fields"]):
        fields[key] = json.loads(raw) if raw.startswith('"') else raw
    return fields


def log_problems(lines: Iterable[str], allowed_events: Iterable[str] = ()) -> list[str]:
    """ERROR/CRITICAL lines whose event is not in ``allowed_events``, and every traceback."""
    allowed = set(allowed_events)
    found: list[str] = []
    in_traceback = False
    for line in lines:
        if in_traceback:  # a traceback printed on stderr: keep it whole, up to its last line
            found[-1] += "\n" + line
            in_traceback = line.startswith((" ", "Traceback", "During", "The above")) or not line
            continue
        event = parse_line(line)
        if event is not None and event.get("level") in ERROR_LEVELS:
            if event["event"] not in allowed:
                found.append(line)
        elif TRACEBACK in line:
            found.append(line)
            in_traceback = event is None
    return found


class AgentRunner:
    """One agent process, its config file and log in ``folder``.

    ``expected_errors`` names the ERROR events this agent may log (a test that provokes them);
    ``expected_exit`` is the exit code the test expects (``None``: any, for a process the test
    kills on purpose). ``wrap`` runs the command in a changed world (``SilentDns.wrap``: no DNS;
    ``SmallDisk.wrap``: a small disk), keeping its pid.
    """

    instances: ClassVar[list[AgentRunner]] = []

    def __init__(
        self,
        folder: Path,
        config: dict[str, Any],
        env: dict[str, str] | None = None,
        *,
        expected_errors: Iterable[str] = (),
        expected_exit: int | None = 0,
        wrap: Callable[[list[str]], list[str]] | None = None,
    ) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        if "observability" not in config:  # agents run side by side in tests: no fixed port
            config = {**config, "observability": {"listen": f"127.0.0.1:{free_port()}"}}
        media = config.get("media", {})
        if "output_root" not in media:  # never the device default, /var/lib/tunnel-agent
            config = {**config, "media": {**media, "output_root": str(folder / "media")}}
        self.observability_url = f"http://{config['observability'].get('listen', '127.0.0.1:9400')}"
        self.config_file = folder / "agent.toml"
        self.config_file.write_text(toml_writer.dumps(config))
        self.expected_errors = set(expected_errors)
        self.expected_exit = expected_exit
        self._checked_chars = 0
        self._exit_checked = False
        command = [sys.executable, "-m", "tunnel_agent", "run", "--config", str(self.config_file)]
        self.process = ManagedProcess(
            wrap(command) if wrap is not None else command,
            folder / "agent.log",
            env={"PYTHONUNBUFFERED": "1", **(env or {})},
        )
        AgentRunner.instances.append(self)

    def output(self) -> str:
        return self.process.output()

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        parsed = (parse_line(line) for line in self.output().splitlines())
        return [e for e in parsed if e is not None and (name is None or e["event"] == name)]

    def wait_event(
        self, name: str, count: int = 1, timeout_s: float = 30.0
    ) -> list[dict[str, Any]]:
        self.process.wait_for(lambda _: len(self.events(name)) >= count, timeout_s)
        return self.events(name)

    def wait_connected(self, timeout_s: float = 30.0) -> None:
        self.wait_event("hub.connected", timeout_s=timeout_s)

    def stop(self) -> int | None:
        """SIGTERM, then wait as long as the agent's own bound allows before a SIGKILL."""
        return self.process.stop(timeout_s=AGENT_STOP_WAIT_S)

    def kill(self) -> int:
        """SIGKILL the agent (a crash or a power cut); its exit code is then not checked."""
        self.expected_exit = None
        self.process.kill()
        return self.process.wait(10)

    @property
    def checked_to_the_end(self) -> bool:
        return self._exit_checked

    def take_problems(self, allowed_events: Iterable[str] = ()) -> list[str]:
        """What is wrong in the log since the last call, and the exit code once it has exited."""
        code = self.process.process.poll()  # before reading: an exited process wrote everything
        text = self.output()
        end = len(text) if code is not None else text.rfind("\n", self._checked_chars) + 1
        lines = text[self._checked_chars : end].splitlines() if end else []
        self._checked_chars = max(self._checked_chars, end)
        found = log_problems(lines, self.expected_errors | set(allowed_events))
        problems = [f"{self.process.log_file}: {line[:4000]}" for line in found]
        if code is not None and not self._exit_checked:
            self._exit_checked = True
            if self.expected_exit is not None and code != self.expected_exit:
                problems.append(
                    f"{self.process.log_file}: agent exited with {code}, "
                    f"expected {self.expected_exit}"
                )
        return problems
