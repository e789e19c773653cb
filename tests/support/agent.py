"""The agent as users run it: ``tunnel-agent run --config FILE`` in a child process."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from tests.support import toml_writer
from tests.support.net import free_port
from tests.support.processes import ManagedProcess

_EVENT = re.compile(r"^\S+ (?P<level>[A-Z]+) (?P<logger>\S+) (?P<event>\S+)(?P<fields>.*)$")
_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def parse_line(line: str) -> dict[str, Any] | None:
    match = _EVENT.match(line)
    if match is None:
        return None
    fields: dict[str, Any] = {"event": match["event"], "level": match["level"]}
    for key, raw in _FIELD.findall(match["fields"]):
        fields[key] = json.loads(raw) if raw.startswith('"') else raw
    return fields


class AgentRunner:
    def __init__(
        self, folder: Path, config: dict[str, Any], env: dict[str, str] | None = None
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
        self.process = ManagedProcess(
            [sys.executable, "-m", "tunnel_agent", "run", "--config", str(self.config_file)],
            folder / "agent.log",
            env={"PYTHONUNBUFFERED": "1", **(env or {})},
        )

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
        return self.process.stop()
