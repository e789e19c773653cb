"""A parsed proxy URL: one small value object shared by the hub link and the tunnels."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit

from tunnel_agent.config.urls import InvalidUrl, check_host

_DEFAULT_PORTS = {"http": 3128, "socks4": 1080, "socks5": 1080, "socks5h": 1080}


class InvalidProxy(ValueError):
    """The proxy URL is unusable; the message says why and never repeats a password."""


@dataclass(frozen=True)
class ProxyAddress:
    """Where the proxy is and how to log in to it.

    ``scheme`` is ``http``, ``socks4``, ``socks5`` or ``socks5h``. Host names of destinations are
    resolved by SOCKS5 proxies in both socks5 forms (remote DNS), which is what a gateway behind a
    proxy usually needs.
    """

    scheme: str
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def display(self) -> str:
        """The URL with the password replaced, for logs and ``check``."""
        auth = ""
        if self.username is not None:
            auth = quote(self.username, safe="") + (":***" if self.password else "") + "@"
        return f"{self.scheme}://{auth}{_bracket(self.host)}:{self.port}"

    def url(self) -> str:
        """The full URL, credentials included, in the form python-socks and picows accept."""
        scheme = "socks5" if self.scheme == "socks5h" else self.scheme
        auth = ""
        if self.username is not None:
            auth = quote(self.username, safe="")
            if self.password is not None:
                auth += ":" + quote(self.password, safe="")
            auth += "@"
        return f"{scheme}://{auth}{_bracket(self.host)}:{self.port}"

    @property
    def sdk_proxy_type(self) -> str:
        """The name azure-iot-device's ``ProxyOptions`` uses for this kind of proxy."""
        return {"http": "HTTP", "socks4": "SOCKS4"}.get(self.scheme, "SOCKS5")


def parse_proxy_url(text: str) -> ProxyAddress:
    """Parse ``http://user:pass@host:port`` or a ``socks4/5/5h`` URL, checking every part."""
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError:
        raise InvalidProxy("not a valid URL") from None
    if port == 0:
        raise InvalidProxy("port must be 1-65535")
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise InvalidProxy("scheme must be http, socks4, socks5 or socks5h")
    if not parts.hostname:
        raise InvalidProxy("host is missing")
    try:
        host = check_host(parts.hostname)
    except InvalidUrl as exc:
        raise InvalidProxy(str(exc)) from None
    if parts.path not in ("", "/"):
        raise InvalidProxy("path is meaningless")
    if parts.query or parts.fragment:
        raise InvalidProxy("query and fragment are meaningless")
    if scheme == "socks4" and parts.password:
        raise InvalidProxy("socks4 has no password")
    return ProxyAddress(
        scheme=scheme,
        host=host,
        port=port if port is not None else _DEFAULT_PORTS[scheme],
        username=unquote(parts.username) if parts.username is not None else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host
