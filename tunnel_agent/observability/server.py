"""The agent's HTTP endpoint: /healthz, /readyz, /metrics (Prometheus) and /status (JSON).

Four read-only GETs for probes and scrapers, served on the agent's own event loop with asyncio
streams rather than aiohttp's server, which would cost the agent about 10 MiB of RSS (a quarter of
a small gateway's budget) for nothing it needs. Nothing here interprets headers: the request line
is all that matters, every answer closes the connection, and reading the request is bounded in
size and time, so a slow or hostile client cannot hold memory or a connection for long.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

from tunnel_agent.config.base import split_host_port
from tunnel_agent.logs import EventLogger
from tunnel_agent.observability.metrics import AgentMetrics
from tunnel_agent.observability.snapshot import AgentView, full_status, readiness

REQUEST_MAX_BYTES = 16 * 1024  # request line and headers
REQUEST_TIMEOUT_S = 10.0
WRITE_TIMEOUT_S = 10.0
LINGER_S = 2.0  # after answering, how long unread input is drained before closing
JSON = "application/json; charset=utf-8"

Answer = tuple[HTTPStatus, str, bytes]


def parse_request_line(head: bytes) -> tuple[str, str] | None:
    """(method, path without query) of ``METHOD TARGET HTTP/x.y``; None when it is not one."""
    line = head.split(b"\r\n", 1)[0]
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return None
    try:
        method, target = parts[0].decode("ascii"), parts[1].decode("ascii")
    except UnicodeDecodeError:
        return None
    return method, target.split("?", 1)[0]


def response_bytes(status: HTTPStatus, content_type: str, body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 {status.value} {status.phrase}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def _json(document: Any, status: HTTPStatus = HTTPStatus.OK) -> Answer:
    return status, JSON, json.dumps(document).encode()


class ObservabilityServer:
    def __init__(self, agent: AgentView, metrics: AgentMetrics, listen: str) -> None:
        self.agent = agent
        self.metrics = metrics
        self.host, self.port = split_host_port(listen)
        self.log = EventLogger("tunnel_agent.observability")
        self._server: asyncio.Server | None = None
        self._routes: dict[str, Callable[[], Answer]] = {
            "/healthz": lambda: _json({"status": "ok"}),
            "/readyz": self._readyz,
            "/metrics": lambda: (HTTPStatus.OK, CONTENT_TYPE_LATEST, self.metrics.exposition()),
            "/status": lambda: _json(full_status(self.agent)),
        }

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(
                self._serve, self.host, self.port, limit=REQUEST_MAX_BYTES
            )
        except OSError as exc:
            self.log.error(
                "observability.listen_failed", listen=f"{self.host}:{self.port}", error=exc.strerror
            )
            return
        self.port = int(self._server.sockets[0].getsockname()[1])
        self.log.info("observability.listening", listen=f"{self.host}:{self.port}")

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    def _readyz(self) -> Answer:
        ready, reasons = readiness(self.agent)
        status = HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE
        return _json({"status": "ready" if ready else "not ready", "reasons": reasons}, status)

    def answer(self, head: bytes) -> Answer:
        request = parse_request_line(head)
        if request is None:
            return HTTPStatus.BAD_REQUEST, JSON, b'{"error": "bad request"}'
        method, path = request
        route = self._routes.get(path)
        if route is None:
            return HTTPStatus.NOT_FOUND, JSON, b'{"error": "not found"}'
        if method != "GET":
            return HTTPStatus.METHOD_NOT_ALLOWED, JSON, b'{"error": "only GET"}'
        try:
            return route()
        except Exception as exc:
            self.log.error("observability.answer_failed", path=path, error=type(exc).__name__)
            return HTTPStatus.INTERNAL_SERVER_ERROR, JSON, b'{"error": "internal error"}'

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, TimeoutError, OSError):
            head = b""  # too long, cut short or too slow: answered 400 and closed
        try:
            writer.write(response_bytes(*self.answer(head)))
            async with asyncio.timeout(WRITE_TIMEOUT_S):
                await writer.drain()
            writer.write_eof()
            # Closing with unread input would reset the connection and could destroy the answer
            # before the client reads it: read on (bounded) until the client closes its side.
            async with asyncio.timeout(LINGER_S):
                while await reader.read(REQUEST_MAX_BYTES):
                    pass
        except (OSError, TimeoutError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(WRITE_TIMEOUT_S):
                    await writer.wait_closed()
