"""tunnel-agent: reach RTSP cameras behind a firewall or NAT through WebSocket tunnels."""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("tunnel-agent")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
