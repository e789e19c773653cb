"""The device agent assembled from settings: hub link + tunnel service, and orderly shutdown."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tunnel_agent import __version__
from tunnel_agent.config.settings import AgentSettings, CameraSettings, any_remote_host_warning
from tunnel_agent.hub.link import HubLink
from tunnel_agent.logs import SECRETS, EventLogger
from tunnel_agent.media.desired import (
    ACCEPTED,
    PROPERTY,
    REFUSED,
    DesiredError,
    acknowledgement,
    parse_desired_streams,
)
from tunnel_agent.media.service import MediaService
from tunnel_agent.observability.twin import TwinReporter
from tunnel_agent.tunnel.connect import ConnectOptions, tunnel_tls_context
from tunnel_agent.tunnel.contract import TUNNEL_OPEN_METHOD
from tunnel_agent.tunnel.errors import unknown_method
from tunnel_agent.tunnel.pump import PumpLimits
from tunnel_agent.tunnel.registry import TunnelRegistry
from tunnel_agent.tunnel.request import EndpointPolicy
from tunnel_agent.tunnel.service import MethodResult, TunnelService
from tunnel_agent.tunnel.targets import CameraTarget
from tunnel_agent.tunnel.user_agent import PlatformInfo, build_user_agent

if TYPE_CHECKING:
    from tunnel_agent.observability.server import ObservabilityServer

SHUTDOWN_GRACE_S = 5.0  # for answers still being sent
CANCEL_GRACE_S = 0.5  # for cancelled work to unwind
# Kept back from shutdown_timeout for the process itself to end (threads, the event loop).
EXIT_RESERVE_S = 1.0
EXIT_FORCED = 70  # EX_SOFTWARE: the stop did not complete in time


def graceful_shutdown_s(shutdown_timeout_s: float) -> float:
    """The part of ``shutdown_timeout`` the agent's own shutdown sequence may take."""
    return max(shutdown_timeout_s - EXIT_RESERVE_S, shutdown_timeout_s / 2)


def exit_after(timeout_s: float) -> None:
    """The last guarantee of a bounded stop: whatever still runs after ``timeout_s`` (a thread
    stuck in a library call, an executor that will not drain), the process ends then."""

    def force() -> None:
        EventLogger("tunnel_agent.agent").error(
            "agent.shutdown_forced", reason=f"still running {timeout_s:g} s after the stop signal"
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(EXIT_FORCED)

    timer = threading.Timer(timeout_s, force)
    timer.daemon = True
    timer.start()


def camera_targets(cameras: list[CameraSettings]) -> list[CameraTarget]:
    return [
        CameraTarget(camera=c.name, host=c.host, port=port, make=c.make, model=c.model)
        for c in cameras
        for port in c.ports
    ]


def build_tunnel_service(settings: AgentSettings, environ: Mapping[str, str]) -> TunnelService:
    tunnel = settings.tunnel
    platform_info = PlatformInfo.current()
    options = ConnectOptions(
        connect_timeout_s=tunnel.connect_timeout,
        handshake_timeout_s=tunnel.handshake_timeout,
        ssl_context=tunnel_tls_context(tunnel.ca_file),
        user_agent=lambda t: build_user_agent(__version__, platform_info, t.make, t.model),
        limits=PumpLimits(
            ping_interval_s=tunnel.ping_interval,
            ping_timeout_s=tunnel.ping_timeout,
            idle_timeout_s=tunnel.idle_timeout,
            max_lifetime_s=tunnel.max_lifetime,
            close_timeout_s=tunnel.close_timeout,
        ),
        proxy=settings.proxy.address,
        environ=dict(environ),
    )
    policy = EndpointPolicy(
        allow_insecure_ws=tunnel.allow_insecure_ws,
        allowed_remote_hosts=tuple(tunnel.allowed_remote_hosts),
    )
    return TunnelService(
        camera_targets(settings.cameras), policy, options, TunnelRegistry(tunnel.max_tunnels)
    )


class Agent:
    """The device agent: tunnels on request from the hub, media tasks, observability, twin."""

    def __init__(self, settings: AgentSettings, environ: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self.log = EventLogger("tunnel_agent.agent")
        self.tunnels = build_tunnel_service(settings, os.environ if environ is None else environ)
        self.media = MediaService(settings)
        self.hub = (
            HubLink(
                settings.hub,
                settings.proxy.address,
                self.dispatch,
                desired_handler=self.on_desired,
            )
            if settings.hub
            else None
        )
        observability = settings.observability
        self.http: ObservabilityServer | None = None
        if observability.enabled:  # aiohttp and prometheus_client only when it is on
            from tunnel_agent.observability.metrics import AgentMetrics
            from tunnel_agent.observability.server import ObservabilityServer

            self.http = ObservabilityServer(self, AgentMetrics(self), observability.listen)
        self.twin = (
            TwinReporter(self, self.hub, observability.twin_report_interval) if self.hub else None
        )
        self._configured_streams = {c.name: list(c.streams) for c in settings.cameras}
        self._desired_lock = asyncio.Lock()
        self._applied_desired: Any = None

    async def dispatch(self, method: str, payload: object) -> MethodResult:
        if method == TUNNEL_OPEN_METHOD:
            return await self.tunnels.tunnel_open(payload)
        error = unknown_method(method)
        self.log.warning("hub.unknown_method", method=method[:64])
        return MethodResult(error.status, error.body())

    async def on_desired(self, desired: dict[str, Any], whole_document: bool) -> None:
        """Apply the ``mediaStreams`` writable property and acknowledge it (IoT PnP convention)."""
        if PROPERTY not in desired:
            return
        value, version = desired[PROPERTY], int(desired.get("$version", 0))
        async with self._desired_lock:
            if whole_document and value == self._applied_desired:
                return  # reconnected: nothing changed while away
            try:
                if value is None:
                    changes = dict(self._configured_streams)
                    description = "removed: streams from the configuration file restored"
                else:
                    changes = parse_desired_streams(
                        value,
                        self.media.camera_settings,
                        self.settings.mqtt is not None,
                        self.settings.media,
                        self._configured_streams,
                    )
                    description = "applied to " + (", ".join(changes) or "no camera")
            except DesiredError as exc:
                self.log.warning("twin.desired_refused", version=version, reason=str(exc))
                self._acknowledge(value, REFUSED, version, str(exc))
                return
            for camera, streams in changes.items():
                await self.media.replace_streams(camera, streams)
            self._applied_desired = value
            self.log.info("twin.desired_applied", version=version, cameras=",".join(changes) or "-")
            self._acknowledge(value, ACCEPTED, version, description)

    def _acknowledge(self, value: Any, code: int, version: int, description: str) -> None:
        if self.twin is not None:
            self.twin.send_soon(acknowledgement(value, code, version, description))

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, then: refuse new tunnels, close open ones, disconnect."""
        for secret in self.settings.secrets():
            SECRETS.add(secret)
        warning = any_remote_host_warning(self.settings)
        if warning is not None:
            self.log.warning("agent.any_remote_host", reason=warning)
        self.log.info(
            "agent.started",
            version=__version__,
            cameras=len(self.settings.cameras),
            ports=",".join(str(t.port) for t in self.tunnels.targets) or "-",
            hub="on" if self.hub else "off",
            media_streams=sum(len(c.streams) for c in self.settings.cameras),
        )
        if self.http is not None:
            await self.http.start()
        hub_stop, media_stop, twin_stop = asyncio.Event(), asyncio.Event(), asyncio.Event()
        workers: dict[str, asyncio.Task[None]] = {
            "media": asyncio.create_task(self.media.run(media_stop))
        }
        if self.hub is not None:
            workers["hub"] = asyncio.create_task(self.hub.run(hub_stop))
        if self.twin is not None:
            workers["twin"] = asyncio.create_task(self.twin.run(twin_stop))
        try:
            await stop.wait()
        finally:
            await self._shutdown(hub_stop, (media_stop, twin_stop), workers)

    async def _shutdown(
        self,
        hub_stop: asyncio.Event,
        other_stops: tuple[asyncio.Event, ...],
        workers: dict[str, asyncio.Task[None]],
    ) -> None:
        """Stop within ``shutdown_timeout``, most important first: no new tunnels, the ones still
        opening cancelled, the open ones closed, the answers sent; then media, twin and hub link
        together. Whatever is not done when the time is up is cancelled, and logged."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + graceful_shutdown_s(self.settings.shutdown_timeout)

        def left(most_s: float = math.inf) -> float:
            return max(0.0, min(most_s, deadline - loop.time()))

        registry = self.tunnels.registry
        registry.stop_accepting()
        for event in other_stops:
            event.set()  # media and twin start stopping at once, in parallel with the rest
        count = len(registry.open_tunnels)
        self.log.info(
            "agent.stopping",
            open_tunnels=count,
            opening_tunnels=registry.opening,
            shutdown_timeout_s=self.settings.shutdown_timeout,
        )
        await registry.close_all("agent shutdown", left(self.settings.tunnel.close_timeout + 1.0))
        if self.hub is not None:
            await self.hub.finish_answers(left(SHUTDOWN_GRACE_S))
        hub_stop.set()
        pending = set(workers.values())
        if pending:
            _, pending = await asyncio.wait(pending, timeout=left())
        if self.http is not None:
            await self.http.stop()
        if pending:
            self.log.warning(
                "agent.shutdown_timeout",
                unfinished=",".join(name for name, task in workers.items() if task in pending),
                shutdown_timeout_s=self.settings.shutdown_timeout,
            )
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=CANCEL_GRACE_S)
        self.log.info("agent.stopped", closed_tunnels=count)
