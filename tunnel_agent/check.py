"""``tunnel-agent check``: is this configuration usable here, before the cloud finds out?"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, TextIO

from tunnel_agent.config.loading import ConfigError, load_settings
from tunnel_agent.config.settings import AgentSettings, any_remote_host_warning
from tunnel_agent.logs import MASK, SECRETS, redact_text
from tunnel_agent.tunnel.errors import host_port


def effective_config(settings: AgentSettings) -> dict[str, Any]:
    """The settings as used, secrets replaced: secret fields, and every URL's password and query
    (a camera ``url`` may carry ``user:password@``; the proxy keeps its user name only)."""
    document: dict[str, Any] = settings.model_dump(mode="json")

    def mask(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: mask(v) for k, v in node.items()}
        if isinstance(node, list):
            return [mask(v) for v in node]
        if node == "**********":
            return MASK
        return redact_text(node) if isinstance(node, str) else node

    document = mask(document)
    proxy = settings.proxy.address
    document["proxy"]["url"] = proxy.display if proxy is not None else None
    return document


async def probe(host: str, port: int, timeout_s: float) -> str | None:
    """None if a TCP connection opens within the timeout, else the reason."""
    try:
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(host, port)
    except TimeoutError:
        return "timed out"
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    writer.close()
    return None


async def _probe_all(settings: AgentSettings, out: TextIO) -> int:
    failures = 0
    for camera in settings.cameras:
        for port in camera.ports:
            problem = await probe(camera.host, port, settings.tunnel.connect_timeout)
            where = host_port(camera.host, port)
            if problem is None:
                out.write(f"ok    camera {camera.name!r} {where} accepts TCP connections\n")
            else:
                failures += 1
                out.write(f"FAIL  camera {camera.name!r} {where}: {problem}\n")
    return failures


def run_check(config: Path | None, out: TextIO) -> int:
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        out.write(f"{exc}\n")
        return 2
    for secret in settings.secrets():
        SECRETS.add(secret)
    out.write(json.dumps(effective_config(settings), indent=2) + "\n")
    warning = any_remote_host_warning(settings)
    if warning is not None:
        out.write(f"WARN  {warning}\n")
    problems = 0
    if settings.hub is None:
        out.write("FAIL  [hub] is not configured: tunnelOpen cannot be received\n")
        problems += 1
    if not any(c.ports for c in settings.cameras):
        out.write("FAIL  no camera lists a port: every tunnelOpen would be refused\n")
        problems += 1
    problems += asyncio.run(_probe_all(settings, out))
    out.write("configuration OK\n" if problems == 0 else f"{problems} problem(s) found\n")
    return 0 if problems == 0 else 1
