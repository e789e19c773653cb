"""The tunnel service in the test's own event loop, for tests that look inside a tunnel."""

from __future__ import annotations

from typing import Any

from tests.support.ws_endpoint import Session, TunnelEndpoint
from tunnel_agent.agent import build_tunnel_service
from tunnel_agent.cloud.devhub.certs import LocalCA
from tunnel_agent.config.settings import AgentSettings
from tunnel_agent.tunnel.camera_tunnel import Tunnel
from tunnel_agent.tunnel.service import TunnelService


def service_for(ca: LocalCA, camera_port: int, **tunnel: Any) -> TunnelService:
    settings = AgentSettings(
        tunnel={"ca_file": ca.cert_file, **tunnel},
        cameras=[{"name": "stub", "host": "127.0.0.1", "ports": [camera_port]}],
    )
    return build_tunnel_service(settings, environ={})


async def open_via(
    service: TunnelService, endpoint: TunnelEndpoint, session: Session, port: int
) -> Tunnel:
    result = await service.tunnel_open(
        {
            "remoteEndpoint": endpoint.url(f"/tunnel/{session.id}"),
            "remoteAuthorizationToken": session.token,
            "localPort": port,
        }
    )
    assert result.status == 200, result.body
    tunnel = service.registry.get(result.body["tunnelId"])
    assert tunnel is not None
    return tunnel
