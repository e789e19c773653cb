"""The agent's configuration schema: a TOML file overridden by ``TUNNEL_AGENT_*`` variables.

Every model forbids unknown keys so that a typo is an error naming the field, not a setting that
silently does nothing. Secrets are ``SecretStr``: printing a settings object never shows them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Annotated, Literal, Self

from pydantic import (
    Field,
    FilePath,
    SecretStr,
    field_validator,
    model_validator,
)

from tunnel_agent.config.base import FileAndEnvironmentSettings, HostPort, Port, Section
from tunnel_agent.config.proxy import InvalidProxy, ProxyAddress, parse_proxy_url
from tunnel_agent.config.urls import InvalidUrl, check_host
from tunnel_agent.hub.connection_string import (
    DEVICE_REQUIRED,
    InvalidConnectionString,
    check_base64_key,
    parse_connection_string,
)
from tunnel_agent.media.settings import MediaSettings, MqttSettings, StreamSettings
from tunnel_agent.media.urls import InvalidSource, parse_source

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")

Seconds = Annotated[float, Field(gt=0, le=86_400)]


class HubSettings(Section):
    """How the device reaches IoT Hub: a connection string, X.509, or DPS provisioning."""

    connection_string: SecretStr | None = None
    ca_file: FilePath | None = None
    websockets: bool = False
    # X.509 device authentication: with hostname and device_id directly, or through DPS.
    hostname: str | None = None
    device_id: str | None = None
    cert_file: FilePath | None = None
    key_file: FilePath | None = None
    key_passphrase: SecretStr | None = None
    # Device Provisioning Service.
    id_scope: str | None = None
    registration_id: str | None = None
    symmetric_key: SecretStr | None = None
    provisioning_host: str = "global.azure-devices-provisioning.net"
    # Link behaviour, in seconds.
    operation_timeout: Seconds = 30.0
    retry_interval: Annotated[int, Field(ge=1, le=3600)] = 10
    keep_alive: Annotated[int, Field(ge=5, le=1740)] = 60
    reconnect_after: Seconds = 90.0
    backoff_max: Seconds = 300.0

    @field_validator("connection_string")
    @classmethod
    def _check_connection_string(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            try:
                parse_connection_string(value.get_secret_value(), DEVICE_REQUIRED)
            except InvalidConnectionString as exc:
                raise ValueError(f"invalid device connection string: {exc}") from None
        return value

    @field_validator("symmetric_key")
    @classmethod
    def _check_symmetric_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            try:
                check_base64_key(value.get_secret_value(), "symmetric_key")
            except InvalidConnectionString as exc:
                raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _one_way_to_authenticate(self) -> Self:
        ways = [
            name
            for name, chosen in (
                ("connection_string", self.connection_string is not None),
                ("id_scope (DPS)", self.id_scope is not None),
                ("hostname + device_id (X.509)", self.hostname is not None),
            )
            if chosen
        ]
        if len(ways) != 1:
            raise ValueError(
                "set exactly one of connection_string, id_scope (DPS) or hostname + device_id"
                f" (X.509); found {len(ways)}: {', '.join(ways) or 'none'}"
            )
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        if self.id_scope is not None:
            if not self.registration_id:
                raise ValueError("DPS needs registration_id")
            if (self.symmetric_key is None) == (self.cert_file is None):
                raise ValueError("DPS needs either symmetric_key or cert_file + key_file")
        if self.hostname is not None and (not self.device_id or self.cert_file is None):
            raise ValueError("X.509 authentication needs device_id, cert_file and key_file")
        return self


class ProxySettings(Section):
    """One proxy for the hub link and the tunnels (HTTP CONNECT, SOCKS4 or SOCKS5)."""

    url: SecretStr | None = None

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            try:
                parse_proxy_url(value.get_secret_value())
            except InvalidProxy as exc:
                raise ValueError(f"invalid proxy URL: {exc}") from None
        return value

    @property
    def address(self) -> ProxyAddress | None:
        return parse_proxy_url(self.url.get_secret_value()) if self.url is not None else None


class TunnelSettings(Section):
    """Limits and trust for tunnels. Times are in seconds."""

    connect_timeout: Annotated[float, Field(gt=0, le=60)] = 5.0
    handshake_timeout: Annotated[float, Field(gt=0, le=120)] = 15.0
    max_tunnels: Annotated[int, Field(ge=1, le=4096)] = 32
    ca_file: FilePath | None = None
    allowed_remote_hosts: list[Annotated[str, Field(min_length=1, max_length=253)]] = []
    allow_insecure_ws: bool = False
    ping_interval: Annotated[float, Field(ge=1, le=600)] = 20.0
    ping_timeout: Annotated[float, Field(ge=1, le=3600)] = 60.0
    idle_timeout: Annotated[float, Field(ge=0, le=86_400 * 7)] = 0.0
    max_lifetime: Annotated[float, Field(ge=0, le=86_400 * 7)] = 0.0
    close_timeout: Annotated[float, Field(gt=0, le=30)] = 2.0


class CameraSettings(Section):
    """One camera: where its RTSP server listens and which ports tunnels may reach."""

    name: str
    host: str = "127.0.0.1"
    ports: list[Port] = []
    url: str | None = None
    username: str | None = None
    password: SecretStr | None = None
    make: str | None = None
    model: str | None = None
    ca_file: FilePath | None = None
    streams: list[StreamSettings] = []

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME_PATTERN.match(value):
            raise ValueError(
                "use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        return value

    @field_validator("host")
    @classmethod
    def _check_host(cls, value: str) -> str:
        try:
            return check_host(value)
        except InvalidUrl as exc:
            raise ValueError(str(exc)) from None

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_source(value)
            except InvalidSource as exc:
                raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _streams_need_a_source(self) -> Self:
        names = [s.name for s in self.streams]
        for index, name in enumerate(names):
            if names.index(name) != index:
                raise ValueError(f"streams.{index}.name: stream name {name!r} is used twice")
        if self.streams and not self.url:
            raise ValueError("url is needed for streams (the media source)")
        return self

    @field_validator("ports")
    @classmethod
    def _unique_ports(cls, value: list[int]) -> list[int]:
        duplicates = sorted({p for p in value if value.count(p) > 1})
        if duplicates:
            raise ValueError(f"port {duplicates[0]} is listed twice")
        return value


class ObservabilitySettings(Section):
    """The health, readiness, metrics and status endpoint, and device twin reporting."""

    enabled: bool = True
    listen: HostPort = "127.0.0.1:9400"
    twin_report_interval: Annotated[float, Field(ge=1, le=3600)] = 5.0


class LogSettings(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


class AgentSettings(FileAndEnvironmentSettings):
    """Everything ``tunnel-agent run`` needs. ``hub`` may be absent for a media-only gateway."""

    hub: HubSettings | None = None
    proxy: ProxySettings = ProxySettings()
    tunnel: TunnelSettings = TunnelSettings()
    cameras: list[CameraSettings] = []
    mqtt: MqttSettings | None = None
    media: MediaSettings = MediaSettings()
    observability: ObservabilitySettings = ObservabilitySettings()
    log: LogSettings = LogSettings()
    # Seconds from SIGTERM to exit, whatever hangs (keep the service manager's stop timeout above).
    shutdown_timeout: Annotated[float, Field(ge=2, le=600)] = 20.0

    def secrets(self) -> Iterator[str]:
        """Every secret this configuration holds, for the log scrubber."""
        for camera in self.cameras:
            if camera.password is not None:
                yield camera.password.get_secret_value()
        proxy = self.proxy.address
        if proxy is not None and proxy.password is not None:
            yield proxy.password
        hub = self.hub
        if hub is not None:
            for secret in (hub.symmetric_key, hub.key_passphrase):
                if secret is not None:
                    yield secret.get_secret_value()
            if hub.connection_string is not None:
                for part in hub.connection_string.get_secret_value().split(";"):
                    key, _, value = part.partition("=")
                    if key == "SharedAccessKey":
                        yield value
        if self.mqtt is not None and self.mqtt.password is not None:
            yield self.mqtt.password.get_secret_value()
        for camera in self.cameras:
            for stream in camera.streams:
                if stream.media_server_password is not None:
                    yield stream.media_server_password.get_secret_value()

    @model_validator(mode="after")
    def _cameras_do_not_clash(self) -> Self:
        names: dict[str, int] = {}
        ports: dict[int, str] = {}
        for index, camera in enumerate(self.cameras):
            if camera.name in names:
                raise ValueError(f"cameras.{index}.name: camera name {camera.name!r} is used twice")
            names[camera.name] = index
            for stream_index, stream in enumerate(camera.streams):
                if stream.task == "snapshot-to-mqtt" and self.mqtt is None:
                    raise ValueError(
                        f"cameras.{index}.streams.{stream_index}: snapshot-to-mqtt needs an [mqtt]"
                        " section"
                    )
            for port in camera.ports:
                if port in ports:
                    raise ValueError(
                        f"cameras.{index}.ports: port {port} is already listed by camera"
                        f" {ports[port]!r}; a localPort must mean one camera"
                    )
                ports[port] = camera.name
        streams = sum(len(camera.streams) for camera in self.cameras)
        if streams > self.media.max_streams:
            raise ValueError(
                f"cameras: {streams} streams configured, more than media.max_streams"
                f" ({self.media.max_streams})"
            )
        return self


def any_remote_host_warning(settings: AgentSettings) -> str | None:
    """The contract lets the cloud name the endpoint, so an empty allow-list stays allowed; but
    the owner should know that it means any host."""
    if settings.hub is None or settings.tunnel.allowed_remote_hosts:
        return None
    return (
        "tunnel.allowed_remote_hosts is empty: tunnels may connect to any host the cloud names;"
        ' list your relays, e.g. allowed_remote_hosts = ["relay.example.net"]'
    )
