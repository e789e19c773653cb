"""The relay's configuration: listener and TLS, the hub's service side, routes, limits."""

from __future__ import annotations

from typing import Annotated, Self

from pydantic import Field, FilePath, SecretStr, field_validator, model_validator

from tunnel_agent.config.base import FileAndEnvironmentSettings, HostPort, Port, Section
from tunnel_agent.config.settings import LogSettings
from tunnel_agent.config.urls import InvalidUrl, parse_url
from tunnel_agent.hub.connection_string import (
    SERVICE_REQUIRED,
    InvalidConnectionString,
    parse_connection_string,
)


class RelayServerSettings(Section):
    """Where devices connect back (WebSocket) and where the session API listens."""

    listen: HostPort = "127.0.0.1:8443"
    public_url: str = "wss://127.0.0.1:8443"
    cert_file: FilePath | None = None
    key_file: FilePath | None = None
    allow_insecure_ws: bool = False
    api_key: SecretStr | None = None
    session_host: str = "127.0.0.1"
    max_sessions: Annotated[int, Field(ge=1, le=10_000)] = 64
    max_tunnels: Annotated[int, Field(ge=1, le=100_000)] = 256
    max_tunnels_per_device: Annotated[int, Field(ge=1, le=10_000)] = 16
    token_ttl: Annotated[float, Field(gt=0, le=600)] = 60.0
    method_timeout: Annotated[int, Field(ge=5, le=300)] = 30
    device_connect_timeout: Annotated[float, Field(gt=0, le=120)] = 10.0

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
        return self


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
    """A fixed consumer port: connections to ``listen`` reach ``local_port`` on ``device_id``."""

    listen: HostPort
    device_id: Annotated[str, Field(min_length=1, max_length=128)]
    local_port: Port
    name: str | None = None


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
