"""Which proxy (if any) a tunnel's WebSocket goes through.

A configured ``[proxy] url`` always applies. Without it the usual environment variables do, as curl
and websockets read them: ``wss_proxy``/``https_proxy`` for wss://, ``ws_proxy``/``http_proxy`` for
ws://, then ``all_proxy``; lower case first; ``no_proxy`` exempts hosts.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from tunnel_agent.config.proxy import InvalidProxy, ProxyAddress, parse_proxy_url

_SCHEME_VARIABLES = {
    "wss": ("wss_proxy", "https_proxy", "all_proxy"),
    "ws": ("ws_proxy", "http_proxy", "all_proxy"),
}


def _lookup(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name) or environ.get(name.upper())
    return value.strip() if value and value.strip() else None


def environment_proxy(scheme: str, host: str, environ: Mapping[str, str]) -> ProxyAddress | None:
    """The proxy the environment names for ``scheme://host``; InvalidProxy if malformed."""
    no_proxy = _lookup(environ, "no_proxy")
    if no_proxy and bypasses_proxy(host, no_proxy):
        return None
    for name in _SCHEME_VARIABLES.get(scheme, ()):
        value = _lookup(environ, name)
        if value:
            if "://" not in value:
                value = "http://" + value
            try:
                return parse_proxy_url(value)
            except InvalidProxy as exc:
                raise InvalidProxy(f"{name}: {exc}") from None
    return None


def choose_proxy(
    scheme: str, host: str, configured: ProxyAddress | None, environ: Mapping[str, str]
) -> ProxyAddress | None:
    if configured is not None:
        return configured
    return environment_proxy(scheme, host, environ)


def bypasses_proxy(host: str, no_proxy: str) -> bool:
    """curl's ``no_proxy`` rules: ``*``, exact names, domain suffixes and IP networks (CIDR)."""
    host = host.lower().strip("[]").rstrip(".")
    for raw in no_proxy.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        if entry.startswith("[") and "]" in entry:
            entry = entry[1 : entry.index("]")]
        elif entry.count(":") == 1:
            entry = entry.split(":", 1)[0]
        entry = entry.lstrip(".").rstrip(".")
        if host == entry or host.endswith("." + entry):
            return True
        if _in_network(host, entry):
            return True
    return False


def _in_network(host: str, entry: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
        network = ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return False
    return address.version == network.version and address in network
