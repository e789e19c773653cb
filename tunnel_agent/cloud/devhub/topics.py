"""Small helpers for IoT Hub and DPS topic names and payloads."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs


def topic_query(topic: str) -> dict[str, str]:
    """The ``?$rid=..&..`` part of an IoT Hub or DPS topic as a dict."""
    _, _, query = topic.partition("?")
    return {key: values[-1] for key, values in parse_qs(query).items()}


def json_or_none(payload: bytes) -> Any:
    try:
        return json.loads(payload) if payload else None
    except (ValueError, UnicodeDecodeError):
        return None
