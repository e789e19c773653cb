"""Configuration: the schema, loading from TOML and environment, and the redacted view."""

from tunnel_agent.config.loading import ConfigError, load_settings
from tunnel_agent.config.settings import AgentSettings, CameraSettings, HubSettings, TunnelSettings

__all__ = [
    "AgentSettings",
    "CameraSettings",
    "ConfigError",
    "HubSettings",
    "TunnelSettings",
    "load_settings",
]
