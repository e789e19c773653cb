"""Validation of a tunnelOpen payload: a pure function from untrusted JSON to a typed request.

The payload comes from the cloud and reaches a header, a URL and a socket; anything that is not
exactly right is refused here with the field that is wrong, before any I/O happens.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import SplitResult, urlsplit

from tunnel_agent.tunnel import contract
from tunnel_agent.tunnel.errors import TunnelError, invalid_field

MAX_TOKEN_BYTES = 8 * 1024
MAX_ENDPOINT_CHARS = 4096
_SECURE_SCHEME = "wss"
_INSECURE_SCHEME = "ws"


@dataclass(frozen=True)
class EndpointPolicy:
    """What the device's owner allows the cloud to ask for."""

    allow_insecure_ws: bool = False
    allowed_remote_hosts: Sequence[str] = ()

    def host_allowed(self, host: str) -> bool:
        if not self.allowed_remote_hosts:
            return True
        host = host.lower().rstrip(".")
        return any(fnmatch.fnmatchcase(host, p.lower()) for p in self.allowed_remote_hosts)


@dataclass(frozen=True)
class RemoteEndpoint:
    """A checked WebSocket URL; ``display`` is the form safe for logs and error targets."""

    url: str = field(repr=False)
    scheme: str
    host: str
    port: int
    display: str

    @property
    def secure(self) -> bool:
        return self.scheme == _SECURE_SCHEME

    @property
    def never_resolves(self) -> bool:
        """A name under ``.invalid`` (RFC 6761 6.4): answered at once, without asking any DNS.

        Otherwise a device whose DNS server does not answer would time out instead.
        """
        host = self.host.lower()
        return host == "invalid" or host.endswith(".invalid")


@dataclass(frozen=True)
class TunnelRequest:
    """A valid tunnelOpen request; the token is kept out of ``repr`` so it cannot leak."""

    endpoint: RemoteEndpoint
    token: str = field(repr=False)
    local_port: int


def parse_tunnel_request(payload: object, policy: EndpointPolicy) -> TunnelRequest:
    """Return the request, or raise :class:`TunnelError` (400) naming the first wrong field."""
    if not isinstance(payload, dict):
        raise invalid_field("payload", "Payload must be a JSON object")
    endpoint = parse_remote_endpoint(payload.get(contract.FIELD_REMOTE_ENDPOINT), policy)
    token = _parse_token(payload.get(contract.FIELD_REMOTE_AUTHORIZATION_TOKEN))
    local_port = _parse_port(payload.get(contract.FIELD_LOCAL_PORT))
    return TunnelRequest(endpoint=endpoint, token=token, local_port=local_port)


def parse_remote_endpoint(value: object, policy: EndpointPolicy) -> RemoteEndpoint:
    name = contract.FIELD_REMOTE_ENDPOINT

    def fail(message: str) -> TunnelError:
        return invalid_field(name, message)

    if value is None:
        raise fail(f"{name} is required")
    if not isinstance(value, str):
        raise fail(f"{name} must be a string")
    if not value:
        raise fail(f"{name} must not be empty")
    if len(value) > MAX_ENDPOINT_CHARS:
        raise fail(f"{name} is longer than {MAX_ENDPOINT_CHARS} characters")
    if not value.isascii() or any(ch <= " " or ch == "\x7f" for ch in value):
        raise fail(f"{name} must be an ASCII URL without spaces or control characters")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise fail(f"{name} is not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme == _INSECURE_SCHEME and not policy.allow_insecure_ws:
        raise fail(f"{name} must use wss:// (ws:// is not allowed by this device)")
    if scheme not in (_SECURE_SCHEME, _INSECURE_SCHEME):
        raise fail(f"{name} must be a wss:// URL")
    if parts.username is not None or parts.password is not None:
        raise fail(f"{name} must not contain credentials")
    if parts.fragment:
        raise fail(f"{name} must not contain a fragment")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise fail(f"{name} has no host")
    if not policy.host_allowed(host):
        raise fail(f"{name} host is not allowed by this device")
    effective_port = port if port is not None else (443 if scheme == _SECURE_SCHEME else 80)
    if effective_port == 0:
        raise fail(f"{name} has an invalid port")
    return RemoteEndpoint(
        url=value,
        scheme=scheme,
        host=host,
        port=effective_port,
        display=endpoint_display(parts, scheme),
    )


def endpoint_display(parts: SplitResult, scheme: str) -> str:
    """The URL without credentials, query string or fragment: the form allowed in logs."""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port is not None else ""
    return f"{scheme}://{host}{port}{parts.path}"


def _parse_token(value: object) -> str:
    name = contract.FIELD_REMOTE_AUTHORIZATION_TOKEN
    if value is None:
        raise invalid_field(name, f"{name} is required")
    if not isinstance(value, str):
        raise invalid_field(name, f"{name} must be a string")
    if not value.strip():
        raise invalid_field(name, f"{name} must not be empty")
    if len(value) > MAX_TOKEN_BYTES or len(value.encode("utf-8")) > MAX_TOKEN_BYTES:
        raise invalid_field(name, f"{name} is longer than {MAX_TOKEN_BYTES} bytes")
    if not value.isascii():
        raise invalid_field(name, f"{name} must be ASCII")
    if any(ch < " " or ch == "\x7f" for ch in value):
        raise invalid_field(name, f"{name} must not contain control characters")
    return value


def _parse_port(value: object) -> int:
    name = contract.FIELD_LOCAL_PORT
    if value is None:
        raise invalid_field(name, f"{name} is required")
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid_field(name, f"{name} must be an integer")
    if not 1 <= value <= 65535:
        raise invalid_field(name, f"{name} must be between 1 and 65535")
    return value
