"""tunnel-agent: reach RTSP cameras behind a firewall or NAT through WebSocket tunnels."""

from importlib import metadata as _metadata
from pathlib import Path as _Path


def _source_tree_version() -> str:
    """pyproject.toml's version, for a source tree run without installing it (scripts/demo.sh)."""
    import tomllib

    try:
        pyproject = (_Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
        return str(tomllib.loads(pyproject)["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "0.0.0+unknown"


try:
    __version__ = _metadata.version("tunnel-agent")
except _metadata.PackageNotFoundError:
    __version__ = _source_tree_version()
