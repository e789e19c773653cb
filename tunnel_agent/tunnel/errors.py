"""The one place where tunnelOpen error answers are built.

The contract asks for ``{"code", "target", "message"}`` with an HTTP status as ``code``. Every
failure path raises :class:`TunnelError`; the hub link turns it into the method response. Messages
are fixed phrases: they never echo a token, a password or a URL's query string.
"""

from __future__ import annotations

from http import HTTPStatus

BAD_REQUEST = int(HTTPStatus.BAD_REQUEST)
NOT_FOUND = int(HTTPStatus.NOT_FOUND)
BAD_GATEWAY = int(HTTPStatus.BAD_GATEWAY)
SERVICE_UNAVAILABLE = int(HTTPStatus.SERVICE_UNAVAILABLE)
GATEWAY_TIMEOUT = int(HTTPStatus.GATEWAY_TIMEOUT)
INTERNAL_ERROR = int(HTTPStatus.INTERNAL_SERVER_ERROR)

MSG_PORT_NOT_AVAILABLE = "Local port is not available"
MSG_CAMERA_UNREACHABLE = "Could not connect to RTSP endpoint"
MSG_TOO_MANY_TUNNELS = "Too many open tunnels"
MSG_SHUTTING_DOWN = "Agent is shutting down"


class TunnelError(Exception):
    """A tunnelOpen failure, carrying the method status and the contract's error body."""

    def __init__(self, status: int, target: str, message: str, code: str | None = None) -> None:
        super().__init__(f"{status} {target}: {message}")
        self.status = status
        self.target = target
        self.message = message
        self.code = code if code is not None else str(status)

    def body(self) -> dict[str, str]:
        return {"code": self.code, "target": self.target, "message": self.message}


def invalid_field(field: str, message: str) -> TunnelError:
    return TunnelError(BAD_REQUEST, field, message)


def port_not_available(host: str, port: int) -> TunnelError:
    return TunnelError(BAD_REQUEST, host_port(host, port), MSG_PORT_NOT_AVAILABLE)


def camera_unreachable(host: str, port: int) -> TunnelError:
    return TunnelError(BAD_REQUEST, host_port(host, port), MSG_CAMERA_UNREACHABLE)


def too_many_tunnels(limit: int) -> TunnelError:
    return TunnelError(SERVICE_UNAVAILABLE, f"maxTunnels={limit}", MSG_TOO_MANY_TUNNELS)


def shutting_down() -> TunnelError:
    return TunnelError(SERVICE_UNAVAILABLE, "agent", MSG_SHUTTING_DOWN)


def unknown_method(name: str) -> TunnelError:
    return TunnelError(NOT_FOUND, name[:64], "Unknown method")


def internal_error(target: str) -> TunnelError:
    return TunnelError(INTERNAL_ERROR, target, "Internal error")


def host_port(host: str, port: int) -> str:
    """``host:port`` with IPv6 literals bracketed, as in a URL authority."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"
