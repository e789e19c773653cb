"""``tunnel-agent relay``: assemble the relay, run it until told to stop, stop it cleanly.

One port (``listen``, TLS) for devices, consumers, the session API and the extensions; one
plain-HTTP port (``metrics_listen``, loopback by default) for ``/metrics``, ``/healthz`` and
``/readyz``. Both go through a front door with header timeouts and connection caps.
"""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from tunnel_agent.cloud.relay.api import Probes, build_app, server_tls
from tunnel_agent.cloud.relay.core import Relay
from tunnel_agent.cloud.relay.extensions import RelayExtension, build_extensions
from tunnel_agent.cloud.relay.front import FrontDoor, Listener, RequestHead, WebSocketRoute, serve
from tunnel_agent.cloud.relay.hub_service import HubServiceClient, limit_tls_read_buffer
from tunnel_agent.cloud.relay.metrics import RelayMetrics
from tunnel_agent.cloud.relay.settings import RelaySettings
from tunnel_agent.config.base import split_host_port
from tunnel_agent.logs import SECRETS, EventLogger

SHUTDOWN_TIMEOUT_S = 3.0
METRICS_MAX_CONNECTIONS = 64
METRICS_MAX_PER_SOURCE = 16
LISTEN_BACKLOG = 1024


class RunningRelay:
    """A started relay: its ports are listening and its routes are open."""

    def __init__(
        self,
        relay: Relay,
        metrics: RelayMetrics,
        *,
        extensions: list[RelayExtension],
        runners: list[web.AppRunner],
        servers: list[Listener],
        probe: asyncio.Task[None],
    ) -> None:
        self.relay = relay
        self.metrics = metrics
        self.extensions = extensions
        self._runners = runners
        self._servers = servers
        self._probe = probe

    @property
    def port(self) -> int:
        return int(self._servers[0].sockets[0].getsockname()[1])

    @property
    def metrics_port(self) -> int:
        return int(self._servers[1].sockets[0].getsockname()[1])

    async def stop(self) -> None:
        self._probe.cancel()
        for server in self._servers:
            server.close()
        await self.relay.close()
        for extension in self.extensions:
            await extension.close()
        for runner in self._runners:
            await runner.cleanup()
        with contextlib.suppress(asyncio.CancelledError):
            await self._probe


def _no_websockets(head: RequestHead, source: str) -> WebSocketRoute | None:
    return None


async def _probe_hub(hub: HubServiceClient, interval_s: float) -> None:
    """Keep ``/readyz`` honest: the hub's REST API is checked now and every ``interval_s``."""
    log = EventLogger("tunnel_agent.relay")
    was: bool | None = None
    while True:
        reachable = await hub.probe()
        if reachable != was:
            if reachable:
                log.info("relay.hub_reachable", hub=hub.rest_url)
            else:
                log.warning(
                    "relay.hub_unreachable", hub=hub.rest_url, reason=hub.unreachable_reason
                )
            was = reachable
        await asyncio.sleep(interval_s)


def _metrics_app(metrics: RelayMetrics, probes: Probes) -> web.Application:
    async def exposition(request: web.Request) -> web.Response:
        response = web.Response(body=metrics.exposition())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    app = web.Application()
    app.router.add_get("/metrics", exposition)
    app.router.add_get("/healthz", probes.healthz)
    app.router.add_get("/readyz", probes.readyz)
    return app


async def start_relay(settings: RelaySettings) -> RunningRelay:
    options = settings.relay
    service = settings.iothub
    secret = service.service_connection_string.get_secret_value()
    for part in secret.split(";"):
        if part.startswith("SharedAccessKey="):
            SECRETS.add(part.partition("=")[2])
    if options.api_key is not None:
        SECRETS.add(options.api_key.get_secret_value())
    limit_tls_read_buffer()
    hub = HubServiceClient(secret, service.rest_url, service.ca_file)
    relay = Relay(options, hub)
    metrics = RelayMetrics(relay)
    extensions = build_extensions(relay)
    loop = asyncio.get_running_loop()
    runners: list[web.AppRunner] = []
    servers: list[Listener] = []
    probe = loop.create_task(_probe_hub(hub, options.hub_probe_interval))
    try:
        for app in (build_app(relay, extensions), _metrics_app(metrics, Probes(relay))):
            runner = web.AppRunner(
                app,
                handle_signals=False,
                access_log=None,
                shutdown_timeout=SHUTDOWN_TIMEOUT_S,
                keepalive_timeout=options.keepalive_timeout,
            )
            await runner.setup()
            runners.append(runner)
        http_servers = [r.server for r in runners]
        assert http_servers[0] is not None and http_servers[1] is not None
        main_door = FrontDoor(
            relay.route_websocket,
            http_servers[0],
            relay.refusals,
            tls=server_tls(options),
            header_timeout_s=options.header_timeout,
            max_connections=options.max_connections,
            max_handshakes_per_source=options.max_handshakes_per_source,
        )
        metrics_door = FrontDoor(
            _no_websockets,
            http_servers[1],
            relay.refusals,
            tls=None,
            header_timeout_s=options.header_timeout,
            max_connections=METRICS_MAX_CONNECTIONS,
            max_handshakes_per_source=METRICS_MAX_PER_SOURCE,
        )
        for door, listen in ((main_door, options.listen), (metrics_door, options.metrics_listen)):
            host, port = split_host_port(listen)
            servers.append(await serve(door, host, port, LISTEN_BACKLOG))
        for route in settings.routes:
            await relay.add_route(route)
    except BaseException:
        probe.cancel()
        for server in servers:
            server.close()
        await relay.close()
        for runner in runners:
            await runner.cleanup()
        raise
    running = RunningRelay(
        relay, metrics, extensions=extensions, runners=runners, servers=servers, probe=probe
    )
    EventLogger("tunnel_agent.relay").info(
        "relay.started",
        listen=f"{split_host_port(options.listen)[0]}:{running.port}",
        metrics=f"{split_host_port(options.metrics_listen)[0]}:{running.metrics_port}",
        public_url=options.public_url,
        hub=hub.rest_url,
        routes=len(settings.routes),
        session_api="on" if options.api_key else "off",
    )
    return running


async def run_relay(settings: RelaySettings, stop: asyncio.Event) -> None:
    running = await start_relay(settings)
    try:
        await stop.wait()
    finally:
        await running.stop()
