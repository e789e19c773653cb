"""The device agent assembled from settings: hub link + tunnel service, and orderly shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Mapping

from tunnel_agent import __version__
from tunnel_agent.config.settings import AgentSettings, CameraSettings
from tunnel_agent.hub.link import HubLink
from tunnel_agent.logs import SECRETS, EventLogger
from tunnel_agent.media.service import MediaService
from tunnel_agent.tunnel.connect import ConnectOptions, tls_context
from tunnel_agent.tunnel.contract import TUNNEL_OPEN_METHOD
from tunnel_agent.tunnel.errors import unknown_method
from tunnel_agent.tunnel.pump import PumpLimits
from tunnel_agent.tunnel.registry import TunnelRegistry
from tunnel_agent.tunnel.request import EndpointPolicy
from tunnel_agent.tunnel.service import MethodResult, TunnelService
from tunnel_agent.tunnel.targets import CameraTarget
from tunnel_agent.tunnel.user_agent import PlatformInfo, build_user_agent

SHUTDOWN_GRACE_S = 5.0


def camera_targets(cameras: list[CameraSettings]) -> list[CameraTarget]:
    return [
        CameraTarget(camera=c.name, host=c.host, port=port, make=c.make, model=c.model)
        for c in cameras
        for port in c.ports
    ]


def register_configured_secrets(settings: AgentSettings) -> None:
    """Tell the log scrubber every secret the configuration holds."""
    for camera in settings.cameras:
        if camera.password is not None:
            SECRETS.add(camera.password.get_secret_value())
    proxy = settings.proxy.address
    if proxy is not None:
        SECRETS.add(proxy.password)
    hub = settings.hub
    if hub is not None:
        for secret in (hub.symmetric_key, hub.key_passphrase):
            if secret is not None:
                SECRETS.add(secret.get_secret_value())
        if hub.connection_string is not None:
            for part in hub.connection_string.get_secret_value().split(";"):
                key, _, value = part.partition("=")
                if key == "SharedAccessKey":
                    SECRETS.add(value)


def build_tunnel_service(settings: AgentSettings, environ: Mapping[str, str]) -> TunnelService:
    tunnel = settings.tunnel
    platform_info = PlatformInfo.current()
    options = ConnectOptions(
        connect_timeout_s=tunnel.connect_timeout,
        handshake_timeout_s=tunnel.handshake_timeout,
        ssl_context=tls_context(tunnel.ca_file),
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
    def __init__(self, settings: AgentSettings, environ: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self.log = EventLogger("tunnel_agent.agent")
        self.tunnels = build_tunnel_service(settings, os.environ if environ is None else environ)
        self.hub = (
            HubLink(settings.hub, settings.proxy.address, self.dispatch) if settings.hub else None
        )
        self.media = MediaService(settings) if any(c.streams for c in settings.cameras) else None

    async def dispatch(self, method: str, payload: object) -> MethodResult:
        if method == TUNNEL_OPEN_METHOD:
            return await self.tunnels.tunnel_open(payload)
        error = unknown_method(method)
        self.log.warning("hub.unknown_method", method=method[:64])
        return MethodResult(error.status, error.body())

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, then: refuse new tunnels, close open ones, disconnect."""
        register_configured_secrets(self.settings)
        self.log.info(
            "agent.started",
            version=__version__,
            cameras=len(self.settings.cameras),
            ports=",".join(str(t.port) for t in self.tunnels.targets) or "-",
            hub="on" if self.hub else "off",
            media_streams=sum(len(c.streams) for c in self.settings.cameras),
        )
        hub_stop, media_stop = asyncio.Event(), asyncio.Event()
        hub_task = asyncio.create_task(self.hub.run(hub_stop)) if self.hub else None
        media_task = asyncio.create_task(self.media.run(media_stop)) if self.media else None
        try:
            await stop.wait()
        finally:
            media_stop.set()
            await self._shutdown(hub_stop, hub_task)
            if media_task is not None:
                await media_task

    async def _shutdown(self, hub_stop: asyncio.Event, hub_task: asyncio.Task[None] | None) -> None:
        registry = self.tunnels.registry
        registry.stop_accepting()
        count = len(registry.open_tunnels)
        self.log.info("agent.stopping", open_tunnels=count)
        await registry.close_all("agent shutdown", self.settings.tunnel.close_timeout + 1.0)
        if self.hub is not None:
            await self.hub.finish_answers(SHUTDOWN_GRACE_S)
        hub_stop.set()
        if hub_task is not None:
            try:
                async with asyncio.timeout(
                    self.settings.hub.operation_timeout if self.settings.hub else 5
                ):
                    await hub_task
            except TimeoutError:
                hub_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await hub_task
        self.log.info("agent.stopped", closed_tunnels=count)
