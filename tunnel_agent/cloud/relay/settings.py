"""The relay's configuration: listener and TLS, the hub's service side, routes, limits."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Literal, Self
from urllib.parse import urlsplit

from pydantic import Field, FilePath, IPvAnyNetwork, SecretStr, field_validator, model_validator

from tunnel_agent.cloud.relay.sources import LOOPBACK_SOURCES
from tunnel_agent.config.base import FileAndEnvironmentSettings, HostPort, Port, Section
from tunnel_agent.config.settings import LogSettings
from tunnel_agent.config.urls import InvalidUrl, parse_url
from tunnel_agent.hub.connection_string import (
    SERVICE_REQUIRED,
    InvalidConnectionString,
    parse_connection_string,
)

MiB = 1024 * 1024


class RelayServerSettings(Section):
    """Where devices connect back (WebSocket) and where the session API listens."""

    listen: HostPort = "127.0.0.1:8443"
    public_url: str = "wss://127.0.0.1:8443"
    cert_file: FilePath | None = None
    key_file: FilePath | None = None
    allow_insecure_ws: bool = False
    api_key: SecretStr | None = None
    # Session TCP listeners: the address they bind, and the host name their answers give.
    session_host: str = "127.0.0.1"
    session_public_host: str | None = None
    metrics_listen: HostPort = "127.0.0.1:9401"
    max_sessions: Annotated[int, Field(ge=1, le=10_000)] = 64
    max_tunnels: Annotated[int, Field(ge=1, le=100_000)] = 256
    max_tunnels_per_device: Annotated[int, Field(ge=1, le=10_000)] = 16
    token_ttl: Annotated[float, Field(gt=0, le=600)] = 60.0
    method_timeout: Annotated[int, Field(ge=5, le=300)] = 30
    device_connect_timeout: Annotated[float, Field(gt=0, le=120)] = 10.0
    # Limits against abuse; times in seconds, 0 disables a lifetime.
    consumer_idle_timeout: Annotated[float, Field(gt=0, le=86_400)] = 120.0
    consumer_max_lifetime: Annotated[float, Field(ge=0, le=7 * 86_400)] = 0.0
    max_connections_per_source: Annotated[int, Field(ge=1, le=10_000)] = 8
    new_connections_burst: Annotated[int, Field(ge=1, le=10_000)] = 10
    new_connections_per_second: Annotated[float, Field(gt=0, le=10_000)] = 1.0
    max_message_bytes: Annotated[int, Field(ge=64 * 1024, le=64 * MiB)] = 4 * MiB
    # Wrong API keys and tokens per source: a burst, then this rate; beyond, 429 for everyone there.
    auth_failures_burst: Annotated[int, Field(ge=1, le=10_000)] = 10
    auth_failures_per_second: Annotated[float, Field(gt=0, le=1000)] = 0.2
    header_timeout: Annotated[float, Field(gt=0, le=10)] = 10.0
    keepalive_timeout: Annotated[float, Field(gt=0, le=75)] = 15.0
    max_connections: Annotated[int, Field(ge=16, le=1_000_000)] = 1024
    max_handshakes_per_source: Annotated[int, Field(ge=1, le=10_000)] = 32
    ping_interval: Annotated[float, Field(ge=1, le=600)] = 20.0
    ping_timeout: Annotated[float, Field(ge=1, le=3600)] = 60.0
    hub_probe_interval: Annotated[float, Field(ge=1, le=3600)] = 10.0
    # The browser view: viewers sharing one session's tunnel, and how long (s) that tunnel stays
    # open after its last viewer leaves, for a viewer who reloads or comes back.
    max_viewers_per_session: Annotated[int, Field(ge=1, le=1000)] = 16
    view_grace_period: Annotated[float, Field(ge=0, le=3600)] = 10.0

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str) -> str:
        try:
            url = parse_url(value, ("wss", "ws"))
        except InvalidUrl as exc:
            raise ValueError(f"{exc}: use a ws:// or wss:// base URL") from None
        if url.query is not None or url.fragment is not None or url.has_credentials:
            raise ValueError(
                "must be a ws:// or wss:// base URL without credentials, query or fragment"
            )
        return value.strip().rstrip("/")

    @field_validator("api_key")
    @classmethod
    def _check_api_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters")
        return value

    @model_validator(mode="after")
    def _tls_or_explicitly_insecure(self) -> Self:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        if self.cert_file is None and not self.allow_insecure_ws:
            raise ValueError(
                "set cert_file and key_file, or allow_insecure_ws = true for development"
            )
        if self.public_url.startswith("ws://") and not self.allow_insecure_ws:
            raise ValueError("public_url is ws:// but allow_insecure_ws is false")
        if self.metrics_listen == self.listen:
            raise ValueError("metrics_listen must differ from listen")
        return self

    @property
    def public_host(self) -> str:
        """The host name in ``public_url``: this replica's own name."""
        return urlsplit(self.public_url).hostname or "127.0.0.1"

    @property
    def session_address_host(self) -> str:
        """The host a session's ``address`` names: set, or the bind address, or the public name."""
        if self.session_public_host:
            return self.session_public_host
        try:
            unspecified = ipaddress.ip_address(self.session_host).is_unspecified
        except ValueError:
            unspecified = False
        return self.public_host if unspecified else self.session_host


class IotHubServiceSettings(Section):
    """The hub the devices are registered in, seen from the service side."""

    service_connection_string: SecretStr
    rest_url: str | None = None
    ca_file: FilePath | None = None

    @field_validator("rest_url")
    @classmethod
    def _check_rest_url(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_url(value, ("https", "http"))
            except InvalidUrl as exc:
                raise ValueError(f"{exc}: use an https:// URL") from None
        return value

    @field_validator("service_connection_string")
    @classmethod
    def _check_connection_string(cls, value: SecretStr) -> SecretStr:
        try:
            parse_connection_string(value.get_secret_value(), SERVICE_REQUIRED)
        except InvalidConnectionString as exc:
            raise ValueError(f"invalid service connection string: {exc}") from None
        return value


class RouteSettings(Section):
    """A fixed consumer port: connections to ``listen`` reach ``local_port`` on ``device_id``.

    Only ``allowed_sources`` may connect (default: this machine). ``protocol = "rtsp"`` steers
    RTSP clients to interleaved TCP; ``"tcp"`` passes bytes through untouched."""

    listen: HostPort
    device_id: Annotated[str, Field(min_length=1, max_length=128)]
    local_port: Port
    name: str | None = None
    allowed_sources: list[IPvAnyNetwork] = [ipaddress.ip_network(n) for n in LOOPBACK_SOURCES]
    protocol: Literal["rtsp", "tcp"] = "rtsp"


class RelaySettings(FileAndEnvironmentSettings):
    relay: RelayServerSettings
    iothub: IotHubServiceSettings
    routes: list[RouteSettings] = []
    log: LogSettings = LogSettings()

    @model_validator(mode="after")
    def _routes_do_not_clash(self) -> Self:
        seen: set[str] = set()
        for index, route in enumerate(self.routes):
            if route.listen in seen:
                raise ValueError(f"routes.{index}.listen: {route.listen} is used twice")
            seen.add(route.listen)
        return self
