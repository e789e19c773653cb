"""tunnelOpen from payload to answer: validate, pick the camera, connect, register, report.

This is the only place that turns the outcome into a method answer, and the only place that logs
the result of a request, so that every request leaves exactly one line.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any, Protocol

from tunnel_agent.logs import SECRETS, EventLogger
from tunnel_agent.tunnel.camera_tunnel import Tunnel
from tunnel_agent.tunnel.connect import ConnectOptions, connect_tunnel
from tunnel_agent.tunnel.errors import TunnelError, internal_error
from tunnel_agent.tunnel.registry import TunnelRegistry
from tunnel_agent.tunnel.request import EndpointPolicy, TunnelRequest, parse_tunnel_request
from tunnel_agent.tunnel.targets import CameraTarget, resolve_target

OK = 200


@dataclass(frozen=True)
class MethodResult:
    """A direct-method answer: the status and the JSON body."""

    status: int
    body: dict[str, Any]


def new_tunnel_id() -> str:
    return secrets.token_hex(6)


class TunnelObserver(Protocol):
    """Told about every answer and every closed tunnel (metrics, twin reporting)."""

    def answered(self, status: int, seconds: float) -> None: ...

    def closed(self, tunnel: Tunnel) -> None: ...


@dataclass
class TunnelTotals:
    """What finished tunnels carried; live tunnels' counters are read from the registry."""

    bytes_to_remote: int = 0
    bytes_to_camera: int = 0
    closed: int = 0


class TunnelService:
    def __init__(
        self,
        targets: list[CameraTarget],
        policy: EndpointPolicy,
        options: ConnectOptions,
        registry: TunnelRegistry,
    ) -> None:
        self.targets = targets
        self.policy = policy
        self.options = options
        self.registry = registry
        self.log = EventLogger("tunnel_agent.tunnel")
        self.totals = TunnelTotals()
        self.observers: list[TunnelObserver] = []

    async def tunnel_open(self, payload: object) -> MethodResult:
        started = time.monotonic()
        request: TunnelRequest | None = None
        tunnel_id = new_tunnel_id()
        log = self.log.bind(tunnel=tunnel_id)
        try:
            request = parse_tunnel_request(payload, self.policy)
            SECRETS.add(request.token)
            target = resolve_target(self.targets, request.local_port)
            log = log.bind(camera=target.camera)
            tunnel, reused = await self.registry.open(
                request, lambda: connect_tunnel(tunnel_id, request, target, self.options, log)
            )
        except TunnelError as error:
            if request is not None:
                SECRETS.discard(request.token)
            log.warning(
                "tunnel.open_failed",
                status=error.status,
                target=error.target,
                message=error.message,
                took_ms=_ms_since(started),
            )
            return self._answer(MethodResult(error.status, error.body()), started)
        except Exception as exc:
            if request is not None:
                SECRETS.discard(request.token)
            log.error(
                "tunnel.open_failed",
                status=500,
                error=type(exc).__name__,
                took_ms=_ms_since(started),
            )
            return self._answer(MethodResult(500, internal_error("agent").body()), started)
        if reused:
            SECRETS.discard(request.token)
            tunnel.log.info("tunnel.open_repeated", took_ms=_ms_since(started))
        else:
            tunnel.closed.add_done_callback(lambda _: self._closed(tunnel, request))
            tunnel.log.info(
                "tunnel.opened",
                port=target.port,
                host=target.host,
                endpoint=tunnel.endpoint_display,
                took_ms=_ms_since(started),
                open_tunnels=len(self.registry.open_tunnels),
            )
        return self._answer(MethodResult(OK, {"tunnelId": tunnel.id}), started)

    def _answer(self, result: MethodResult, started: float) -> MethodResult:
        seconds = time.monotonic() - started
        for observer in self.observers:
            observer.answered(result.status, seconds)
        return result

    def _closed(self, tunnel: Tunnel, request: TunnelRequest) -> None:
        SECRETS.discard(request.token)
        self.totals.bytes_to_remote += tunnel.bytes_to_remote
        self.totals.bytes_to_camera += tunnel.bytes_to_camera
        self.totals.closed += 1
        for observer in self.observers:
            observer.closed(tunnel)
        tunnel.log.info(
            "tunnel.closed",
            port=tunnel.target.port,
            bytes_to_remote=tunnel.bytes_to_remote,
            bytes_to_camera=tunnel.bytes_to_camera,
            duration_s=round(tunnel.duration_s, 3),
            reason=tunnel.close_reason,
        )


def _ms_since(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)
