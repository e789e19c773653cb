"""URLs and host names in the configuration, checked part by part when the configuration loads.

URLs go through pydantic's URL parser (the WHATWG URL standard, as browsers parse them), never
through string splitting, so that ``mqtt://broker:abc`` is an error naming the field at start-up
and not a crash in a task later. Hosts must be an IP address or a DNS name.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from urllib.parse import unquote

from pydantic_core import Url, ValidationError

_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
MAX_HOST_CHARS = 253
HOST_RULE = "must be a host name or an IP address"


class InvalidUrl(ValueError):
    """The URL or host is unusable; the message says why and never repeats the input."""


@dataclass(frozen=True)
class ParsedUrl:
    """A checked URL. ``host`` is lower case without IPv6 brackets; ``port`` is None when the URL
    names none (http and https get their default port from the parser); credentials are decoded."""

    scheme: str
    host: str
    port: int | None
    path: str
    query: str | None
    fragment: str | None
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def has_credentials(self) -> bool:
        return self.username is not None or self.password is not None


def parse_url(text: str, schemes: Collection[str]) -> ParsedUrl:
    """Parse ``text`` as a URL with one of ``schemes`` and a valid host and port."""
    try:
        url = Url(text.strip())
    except ValidationError as exc:
        reason = str(exc.errors(include_input=False)[0]["msg"])
        raise InvalidUrl(reason.removeprefix("Input should be a valid URL, ")) from None
    if url.scheme not in schemes:
        raise InvalidUrl(f"scheme must be {' or '.join(f'{s}://' for s in schemes)}")
    if not url.host:
        raise InvalidUrl("host is missing")
    if url.port == 0:
        raise InvalidUrl("port must be 1-65535")
    try:
        host = check_host(url.host)
    except InvalidUrl:
        raise InvalidUrl(f"host {HOST_RULE}") from None
    return ParsedUrl(
        scheme=url.scheme,
        host=host,
        port=url.port,
        path=url.path or "",
        query=url.query,
        fragment=url.fragment,
        username=unquote(url.username) if url.username else None,
        password=unquote(url.password) if url.password else None,
    )


def check_host(text: str) -> str:
    """An IP address (IPv6 with or without brackets) or a DNS name, normalised to lower case."""
    host = text.strip()
    bare = host.removeprefix("[").removesuffix("]")
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        pass
    name = bare.lower().removesuffix(".")
    if host != bare or not name or len(name) > MAX_HOST_CHARS:
        raise InvalidUrl(HOST_RULE)
    if not all(_LABEL.match(label) for label in name.split(".")):
        raise InvalidUrl(HOST_RULE)
    return name
