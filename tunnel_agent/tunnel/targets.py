"""Which camera a tunnelOpen ``localPort`` means: the cloud names a port, the device decides."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tunnel_agent.tunnel.errors import port_not_available

UNKNOWN_HOST = "localhost"


@dataclass(frozen=True)
class CameraTarget:
    """The TCP destination of one tunnel and what the User-Agent says about it."""

    camera: str
    host: str
    port: int
    make: str | None = None
    model: str | None = None


def resolve_target(targets: Iterable[CameraTarget], local_port: int) -> CameraTarget:
    """The target configured for ``local_port``; else 400 'Local port is not available'."""
    for target in targets:
        if target.port == local_port:
            return target
    raise port_not_available(UNKNOWN_HOST, local_port)
