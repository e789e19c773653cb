"""Load settings from a TOML file and the environment, with errors that name the field.

pydantic's own messages repeat the offending input; for secrets that would be a leak, so errors are
re-rendered here from the field location and the reason only.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping, MutableMapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings

from tunnel_agent.config.settings import AgentSettings

# Keys whose relative paths are taken relative to the configuration file. (Relative stream paths
# are folders under [media] output_root instead.)
PATH_KEYS: tuple[tuple[str, ...], ...] = (
    ("hub", "ca_file"),
    ("hub", "cert_file"),
    ("hub", "key_file"),
    ("tunnel", "ca_file"),
    ("cameras", "ca_file"),
    ("cameras", "streams", "media_server_ca_file"),
    ("mqtt", "ca_file"),
    ("mqtt", "cert_file"),
    ("mqtt", "key_file"),
    ("media", "output_root"),
)


class ConfigError(Exception):
    """Configuration that cannot be used; ``problems`` holds one line per wrong field."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid configuration:\n  " + "\n  ".join(self.problems))


SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def read_toml(path: Path, path_keys: Iterable[tuple[str, ...]] = PATH_KEYS) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError([f"config file not found: {path}"]) from None
    except OSError as exc:
        raise ConfigError([f"config file {path}: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"config file {path}: {exc}"]) from None
    resolve_relative_paths(data, path.parent, path_keys)
    return data


def resolve_relative_paths(
    data: MutableMapping[str, Any], base: Path, keys: Iterable[tuple[str, ...]]
) -> None:
    for key in keys:
        _resolve_in(data, base, key)


def _resolve_in(node: Any, base: Path, key: tuple[str, ...]) -> None:
    if isinstance(node, list):
        for item in node:
            _resolve_in(item, base, key)
        return
    if not isinstance(node, MutableMapping) or key[0] not in node:
        return
    if len(key) > 1:
        _resolve_in(node[key[0]], base, key[1:])
        return
    value = node[key[0]]
    if isinstance(value, str) and value and not Path(value).is_absolute():
        node[key[0]] = str(base / value)


def load_settings(path: Path | None = None) -> AgentSettings:
    """Agent settings from ``path`` (if any) overridden by ``TUNNEL_AGENT_*`` variables."""
    return load_any(AgentSettings, path, PATH_KEYS)


def load_any(
    cls: type[SettingsT], path: Path | None, path_keys: Iterable[tuple[str, ...]]
) -> SettingsT:
    """Settings of any of the project's schemas, with the same file, environment and errors."""
    data = read_toml(path, path_keys) if path is not None else {}
    try:
        return cls(**data)
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc.errors(include_input=False), data)) from None


def describe_errors(errors: Iterable[Mapping[str, Any]], data: Mapping[str, Any]) -> list[str]:
    lines = []
    for error in errors:
        location = ".".join(str(part) for part in error.get("loc", ()))
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        camera = _camera_name(error.get("loc", ()), data)
        if camera:
            location += f" (camera {camera})"
        lines.append(f"{location or 'configuration'}: {message}" if location else message)
    return lines


def _camera_name(loc: Iterable[Any], data: Mapping[str, Any]) -> str | None:
    """'lobby' or 'lobby', stream 'snaps' for errors located inside a camera entry."""
    parts = list(loc)
    camera = (
        _named(data.get("cameras"), parts[1]) if len(parts) >= 2 and parts[0] == "cameras" else None
    )
    if camera is None:
        return None
    label = repr(str(camera["name"]))
    if len(parts) >= 4 and parts[2] == "streams":
        stream = _named(camera.get("streams"), parts[3])
        if stream is not None:
            label += f", stream {str(stream['name'])!r}"
    return label


def _named(entries: Any, index: Any) -> Mapping[str, Any] | None:
    if isinstance(entries, list) and isinstance(index, int) and 0 <= index < len(entries):
        entry = entries[index]
        if isinstance(entry, Mapping) and isinstance(entry.get("name"), str):
            return entry
    return None
