"""``tunnel-agent status``: the agent's /status endpoint as two tables."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any, TextIO

TIMEOUT_S = 5.0


def fetch_status(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url.rstrip('/')}/status", timeout=TIMEOUT_S) as response:  # noqa: S310 - http(s) URL from the operator
        document = json.load(response)
    if not isinstance(document, dict):
        raise TypeError("unexpected /status answer")
    return document


def _table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            + "\n"
        )


def _human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"


def render(status: dict[str, Any], out: TextIO) -> None:
    hub = status.get("hub")
    hub_text = (
        "not configured" if hub is None else ("connected" if hub["connected"] else "DISCONNECTED")
    )
    if hub:
        hub_text += (
            f" as {hub.get('device')} to {hub.get('host')} ({hub.get('reconnects', 0)} reconnects)"
        )
    out.write(f"tunnel-agent {status.get('version')}  hub: {hub_text}\n\n")
    tunnels = status.get("tunnels", [])
    out.write(
        f"Open tunnels: {len(tunnels)} ({status.get('tunnels_closed', 0)} closed since start)\n"
    )
    if tunnels:
        rows = [["ID", "CAMERA", "PORT", "TO REMOTE", "TO CAMERA", "AGE"]]
        for t in tunnels:
            rows.append(
                [
                    t["id"],
                    t["camera"],
                    str(t["port"]),
                    _human_bytes(t["bytes_to_remote"]),
                    _human_bytes(t["bytes_to_camera"]),
                    f"{t['age_s']:.0f} s",
                ]
            )
        _table(rows, out)
    media = status.get("media") or {}
    out.write(f"\nMedia tasks: {sum(len(c['tasks']) for c in media.values())}\n")
    if media:
        rows = [["CAMERA", "STREAM", "TASK", "STATE", "COUNTERS", "LAST ERROR"]]
        for camera, entry in media.items():
            source = entry.get("source") or {}
            rows.append(
                [
                    camera,
                    "(source)",
                    "",
                    str(source.get("state", "-")),
                    _counters(
                        source, skip={"state", "reason", "last_packet_age_s", "keyframes_only"}
                    ),
                    str(source.get("reason") or ""),
                ]
            )
            for name, task in entry["tasks"].items():
                rows.append(
                    [
                        camera,
                        name,
                        task["task"],
                        task["state"],
                        _counters(task, skip={"state", "reason", "task"}),
                        str(task.get("reason") or ""),
                    ]
                )
        _table(rows, out)
    mqtt = status.get("mqtt")
    if mqtt is not None:
        state = "connected" if mqtt.get("connected") else "DISCONNECTED"
        out.write(f"\nMQTT: {state}, {_counters(mqtt, skip={'connected'})}\n")


def _counters(values: dict[str, Any], skip: set[str]) -> str:
    return (
        " ".join(f"{k}={v}" for k, v in values.items() if k not in skip and v not in (None, 0))
        or "-"
    )


def run_status(url: str, out: TextIO, as_json: bool = False) -> int:
    try:
        status = fetch_status(url)
    except (OSError, ValueError, TypeError) as exc:
        out.write(f"tunnel-agent status: cannot read {url}/status: {exc}\n")
        return 1
    if as_json:
        out.write(json.dumps(status, indent=2) + "\n")
    else:
        render(status, out)
    return 0
