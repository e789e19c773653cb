"""The base of every configuration section: unknown keys are errors, values are immutable."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "TUNNEL_AGENT_"

Port = Annotated[int, Field(ge=1, le=65535)]


def split_host_port(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port``; ValueError with the reason otherwise."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("use host:port, e.g. 127.0.0.1:8554")
    return host.removeprefix("[").removesuffix("]"), int(port)


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
