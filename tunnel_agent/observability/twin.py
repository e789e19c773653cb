"""Device twin reporting: what the agent is, which cameras it serves and how its work is going.

Reported properties are recomputed every ``interval`` seconds and only the top-level properties that
changed are sent (rate-limited, no chatter). Acknowledgements of writable properties go out at once.
Twin property names cannot hold '.', '$' or spaces, so per-camera data are lists, not maps.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from tunnel_agent import __version__
from tunnel_agent.aio import wait_any
from tunnel_agent.hub.link import HubLink
from tunnel_agent.logs import EventLogger
from tunnel_agent.observability.snapshot import AgentView
from tunnel_agent.tunnel.user_agent import PlatformInfo


def reported_state(agent: AgentView, platform: PlatformInfo) -> dict[str, Any]:
    cameras = agent.media.camera_settings.values()
    media_tasks = [
        {
            "camera": camera.camera.name,
            "stream": task.name,
            "task": task.kind,
            "state": task.state.value,
            "error": task.reason or "",
        }
        for camera in agent.media.cameras
        for task in camera.tasks
    ]
    return {
        "agent": {
            "version": __version__,
            "os": f"{platform.system} {platform.release}",
            "cpu": platform.machine,
        },
        "cameras": [{"name": c.name, "ports": list(c.ports)} for c in cameras],
        "openTunnels": len(agent.tunnels.registry.open_tunnels),
        "media": media_tasks,
    }


class TwinReporter:
    def __init__(self, agent: AgentView, hub: HubLink, interval_s: float) -> None:
        self.agent = agent
        self.hub = hub
        self.interval_s = interval_s
        self.platform = PlatformInfo.current()
        self.log = EventLogger("tunnel_agent.twin")
        self.reported: dict[str, Any] = {}
        self._urgent: list[dict[str, Any]] = []
        self._wake = asyncio.Event()
        self._state_due_at = 0.0

    def send_soon(self, patch: dict[str, Any]) -> None:
        """Queue a patch (a writable-property acknowledgement) to go out before the next round."""
        self._urgent.append(patch)
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        self._state_due_at = time.monotonic() + self.interval_s
        while not stop.is_set():
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                due_in_s = max(0.0, self._state_due_at - time.monotonic())
                await asyncio.wait_for(wait_any(stop, self._wake), due_in_s)
            if stop.is_set() or not self.hub.connected:
                continue
            await self.flush()

    async def flush(self) -> None:
        """Acknowledgements at once; the state only when its interval has passed."""
        while self._urgent:
            if not await self.hub.report(self._urgent[0]):
                return
            self._urgent.pop(0)
        now = time.monotonic()
        if now < self._state_due_at:
            return
        self._state_due_at = now + self.interval_s
        state = reported_state(self.agent, self.platform)
        changed = {key: value for key, value in state.items() if self.reported.get(key) != value}
        if changed and await self.hub.report(changed):
            self.reported.update(changed)
            self.log.info("twin.reported", properties=",".join(sorted(changed)))
