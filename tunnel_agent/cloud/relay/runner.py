"""``tunnel-agent relay``: run the relay until told to stop."""

from __future__ import annotations

import asyncio

from aiohttp import web

from tunnel_agent.cloud.relay.api import build_app, server_tls
from tunnel_agent.cloud.relay.core import Relay
from tunnel_agent.cloud.relay.hub_service import HubServiceClient
from tunnel_agent.cloud.relay.settings import RelaySettings
from tunnel_agent.config.base import split_host_port
from tunnel_agent.logs import SECRETS, EventLogger


class RunningRelay:
    """A started relay: its routes are listening and its WebSocket endpoint is up."""

    def __init__(self, relay: Relay, runner: web.AppRunner, port: int) -> None:
        self.relay = relay
        self.runner = runner
        self.port = port

    async def stop(self) -> None:
        await self.relay.close()
        await self.runner.cleanup()


async def start_relay(settings: RelaySettings) -> RunningRelay:
    service = settings.iothub
    secret = service.service_connection_string.get_secret_value()
    for part in secret.split(";"):
        if part.startswith("SharedAccessKey="):
            SECRETS.add(part.partition("=")[2])
    if settings.relay.api_key is not None:
        SECRETS.add(settings.relay.api_key.get_secret_value())
    hub = HubServiceClient(secret, service.rest_url, service.ca_file)
    relay = Relay(settings.relay, hub)
    runner = web.AppRunner(
        build_app(relay), handle_signals=False, access_log=None, shutdown_timeout=3
    )
    await runner.setup()
    host, port = split_host_port(settings.relay.listen)
    site = web.TCPSite(runner, host, port, ssl_context=server_tls(settings.relay))
    try:
        await site.start()
        for route in settings.routes:
            await relay.add_route(route)
    except BaseException:
        await relay.close()
        await runner.cleanup()
        raise
    bound = int(runner.addresses[0][1])
    EventLogger("tunnel_agent.relay").info(
        "relay.started",
        listen=f"{host}:{bound}",
        public_url=settings.relay.public_url,
        hub=hub.rest_url,
        routes=len(settings.routes),
        session_api="on" if settings.relay.api_key else "off",
    )
    return RunningRelay(relay, runner, bound)


async def run_relay(settings: RelaySettings, stop: asyncio.Event) -> None:
    running = await start_relay(settings)
    try:
        await stop.wait()
    finally:
        await running.stop()
