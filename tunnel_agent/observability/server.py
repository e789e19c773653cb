"""The agent's HTTP endpoint: /healthz, /readyz, /metrics (Prometheus) and /status (JSON)."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from tunnel_agent.config.base import split_host_port
from tunnel_agent.logs import EventLogger
from tunnel_agent.observability.metrics import AgentMetrics
from tunnel_agent.observability.snapshot import AgentView, full_status, readiness


class ObservabilityServer:
    def __init__(self, agent: AgentView, metrics: AgentMetrics, listen: str) -> None:
        self.agent = agent
        self.metrics = metrics
        self.host, self.port = split_host_port(listen)
        self.log = EventLogger("tunnel_agent.observability")
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/status", self._status)
        return app

    async def start(self) -> None:
        self._runner = web.AppRunner(
            self.app(), handle_signals=False, access_log=None, shutdown_timeout=2
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            self.log.error(
                "observability.listen_failed", listen=f"{self.host}:{self.port}", error=exc.strerror
            )
            return
        self.port = int(self._runner.addresses[0][1])
        self.log.info("observability.listening", listen=f"{self.host}:{self.port}")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        ready, reasons = readiness(self.agent)
        return web.json_response(
            {"status": "ready" if ready else "not ready", "reasons": reasons},
            status=200 if ready else 503,
        )

    async def _metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=self.metrics.exposition())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(full_status(self.agent))
