"""One consistent picture of the agent's state, shared by /status, /metrics and twin reporting."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict
from typing import Any, Protocol

from tunnel_agent import __version__, malloc
from tunnel_agent.hub.link import HubLink
from tunnel_agent.media.service import MediaService
from tunnel_agent.tunnel.service import TunnelService


class AgentView(Protocol):
    """What the observability side reads from a running agent."""

    tunnels: TunnelService
    hub: HubLink | None
    media: MediaService


def hub_status(agent: AgentView) -> dict[str, Any] | None:
    hub = agent.hub
    if hub is None:
        return None
    identity = hub.identity
    return {
        "connected": hub.connected,
        "reconnects": hub.reconnects,
        "host": identity.hostname if identity else None,
        "device": identity.device_id if identity else None,
    }


def tunnels_status(agent: AgentView) -> list[dict[str, Any]]:
    now = time.monotonic()
    return [
        {
            "id": t.id,
            "camera": t.target.camera,
            "port": t.target.port,
            "endpoint": t.endpoint_display,
            "bytes_to_remote": t.bytes_to_remote,
            "bytes_to_camera": t.bytes_to_camera,
            "age_s": round(now - t.opened_at, 1),
        }
        for t in agent.tunnels.registry.open_tunnels
    ]


def media_status(agent: AgentView) -> dict[str, Any]:
    return {camera.camera.name: camera.status() for camera in agent.media.cameras}


def mqtt_status(agent: AgentView) -> dict[str, Any] | None:
    publisher = agent.media.publisher
    if publisher is None:
        return None
    return {
        "connected": publisher.connected,
        "queued": publisher.queued,
        **dict(publisher.counters),
    }


# Heavy libraries a configuration loads only when it uses them (media sources and tasks, the MQTT
# publisher, HTTP snapshot cameras), and requests, which only the IoT SDK's IoT Edge and blob
# upload parts use (tunnel_agent.hub.sdk): /status says which ones this process has loaded.
OPTIONAL_LIBRARIES = ("av", "aiohttp", "aiomqtt", "requests")


def rss_bytes() -> int | None:
    """Resident memory of this process (Linux); None where /proc is not there."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def process_status() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "rss_bytes": rss_bytes(),
        "libraries_loaded": {name: name in sys.modules for name in OPTIONAL_LIBRARIES},
        "malloc": {**asdict(malloc.applied()), "arenas": malloc.arena_count()},
    }


def full_status(agent: AgentView) -> dict[str, Any]:
    totals = agent.tunnels.totals
    return {
        "version": __version__,
        "hub": hub_status(agent),
        "tunnels": tunnels_status(agent),
        "tunnels_closed": totals.closed,
        "media": media_status(agent),
        "mqtt": mqtt_status(agent),
        "process": process_status(),
    }


def readiness(agent: AgentView) -> tuple[bool, list[str]]:
    """Ready when the hub link is up (or no hub is configured); the reasons when not."""
    reasons = []
    if agent.hub is not None and not agent.hub.connected:
        reasons.append("hub link is not connected")
    if not agent.tunnels.registry.accepting:
        reasons.append("agent is stopping")
    return not reasons, reasons
