"""The base of every configuration section: unknown keys are errors, values are immutable."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from tunnel_agent.config.urls import InvalidUrl, check_host

ENV_PREFIX = "TUNNEL_AGENT_"

Port = Annotated[int, Field(ge=1, le=65535)]


def split_host_port(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` (port 0: any free port); ValueError with the reason."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("use host:port, e.g. 127.0.0.1:8554")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ValueError("put an IPv6 address in brackets: [::1]:8554")
    try:
        return check_host(host), int(port)
    except InvalidUrl:
        raise ValueError("use host:port with an IP address or a DNS name") from None


def _check_listen(value: str) -> str:
    split_host_port(value)
    return value


HostPort = Annotated[str, AfterValidator(_check_listen)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileAndEnvironmentSettings(BaseSettings):
    """A whole configuration: the TOML file (given as arguments), overridden by the environment."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", frozen=True
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment first so it overrides the TOML file, which arrives as init arguments.
        return (env_settings, init_settings)
