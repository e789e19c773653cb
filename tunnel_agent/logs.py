"""Structured logs: one line per event, ``key=value`` text or JSON, secrets scrubbed in every part.

Code logs an event name and fields (``log.info("tunnel.closed", bytes_up=...)``); loggers bound to a
tunnel carry its id on every line. Callers never pass secrets, and as a second line of defence the
formatters replace every registered secret and every URL password or query string, whatever library
produced the record. They scrub each part *before* quoting or JSON-escaping it: escaping changes a
secret's spelling (``"`` becomes ``\\"``), and a scrubber that ran afterwards would miss it.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@?#]*):[^\s@/]*@")
_URL_QUERY = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^\s?#\"']*)\?[^\s\"']*")
_SAS = re.compile(
    r"(?P<head>(SharedAccessKey|SharedAccessSignature|sig)=)[^;&\s\"']+", re.IGNORECASE
)
_BEARER = re.compile(r"(?P<head>Bearer\s+)[^\s\"',;]+", re.IGNORECASE)
MASK = "***"
_MIN_SECRET_CHARS = 4


class SecretRegistry:
    """Secrets known at run time (tokens of open tunnels, configured passwords), thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def add(self, secret: str | None) -> None:
        if secret and len(secret) >= _MIN_SECRET_CHARS:
            with self._lock:
                self._counts[secret] = self._counts.get(secret, 0) + 1

    def discard(self, secret: str | None) -> None:
        if not secret:
            return
        with self._lock:
            left = self._counts.get(secret, 0) - 1
            if left > 0:
                self._counts[secret] = left
            else:
                self._counts.pop(secret, None)

    def scrub(self, text: str) -> str:
        with self._lock:
            secrets = sorted(self._counts, key=len, reverse=True)
        for secret in secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text


SECRETS = SecretRegistry()


def redact_text(text: str) -> str:
    """Remove URL passwords and query strings, SAS keys, bearer tokens and registered secrets."""
    text = SECRETS.scrub(text)
    text = _URL_PASSWORD.sub(rf"\g<head>:{MASK}@", text)
    text = _URL_QUERY.sub(rf"\g<head>?{MASK}", text)
    text = _SAS.sub(rf"\g<head>{MASK}", text)
    return _BEARER.sub(rf"\g<head>{MASK}", text)


class EventLogger:
    """A logger that writes events with fields, optionally bound to context such as a tunnel id."""

    def __init__(self, name: str, **context: Any) -> None:
        self._logger = logging.getLogger(name)
        self._context = context

    def bind(self, **context: Any) -> EventLogger:
        bound = EventLogger(self._logger.name, **{**self._context, **context})
        return bound

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields)

    def _log(self, level: int, event: str, fields: dict[str, Any]) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(level, event, extra={"fields": {**self._context, **fields}})


def _fields_of(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, dict) else {}


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _text_value(value: Any) -> str:
    text = f"{value:.3f}" if isinstance(value, float) else redact_text(str(value))
    if not text or any(ch.isspace() or ch in '"=' for ch in text):
        return json.dumps(text)
    return text


class TextFormatter(logging.Formatter):
    """``<time> <LEVEL> <logger> <event> key=value ...`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        message = redact_text(record.getMessage()).replace("\n", "\\n")
        parts = [_timestamp(record), record.levelname, record.name, message]
        parts.extend(
            f"{redact_text(str(key))}={_text_value(value)}"
            for key, value in _fields_of(record).items()
        )
        if record.exc_info:
            parts.append("error=" + json.dumps(redact_text(self.formatException(record.exc_info))))
        return " ".join(parts)


# Keys every JSON line has; a field of the same name is kept under ``field_<name>``.
JSON_RESERVED_KEYS = frozenset({"ts", "level", "logger", "event", "error"})


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "event": redact_text(record.getMessage()),
        }
        for key, value in _fields_of(record).items():
            name = redact_text(str(key))
            while name in JSON_RESERVED_KEYS or name in document:
                name = f"field_{name}"
            document[name] = (
                value if isinstance(value, int | float | bool) else redact_text(str(value))
            )
        if record.exc_info:
            document["error"] = redact_text(self.formatException(record.exc_info))
        return json.dumps(document, ensure_ascii=False)


# Third-party loggers that are chatty at INFO (the IoT SDK logs every pipeline step).
QUIET_LOGGERS: Iterable[str] = (
    "azure",
    "paho",
    "picows",
    "websockets",
    "aiohttp.access",
    "asyncio",
)


def configure_logging(
    level: str = "INFO",
    fmt: Literal["text", "json"] = "text",
    stream: TextIO | None = None,
) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
