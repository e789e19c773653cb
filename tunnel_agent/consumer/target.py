"""What ``tunnel-agent connect`` is told: the session's connect URL and its token, checked.

Pure: parsing the URL, finding the token (``TUNNEL_AGENT_TOKEN`` or ``--token-file``, never the
command line, which any user can read in the process list) and deriving the session's REST URL.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

TOKEN_VARIABLE = "TUNNEL_AGENT_TOKEN"
MAX_TOKEN_CHARS = 4096
_CONNECT_PATH = re.compile(r"^(?P<base>.*)/v1/sessions/(?P<id>[^/]+)/connect$")


class ConnectError(Exception):
    """``connect`` cannot start; the message is for the user and carries no secret."""


@dataclass(frozen=True)
class ConnectTarget:
    """A session's connect URL, split into what the proxy needs."""

    url: str
    secure: bool
    host: str
    port: int
    session_id: str
    token: str = field(repr=False)

    @property
    def session_url(self) -> str:
        """``GET`` here (with the token) says whether the session is usable."""
        scheme = "https" if self.secure else "http"
        path = urlsplit(self.url).path.removesuffix("/connect")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}{path}"

    @property
    def display(self) -> str:
        return self.url


def parse_connect_url(url: str, token: str, *, allow_insecure: bool) -> ConnectTarget:
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise ConnectError(f"not a valid URL: {url}") from None
    if parts.scheme not in ("wss", "ws"):
        raise ConnectError("the connect URL must start with wss://")
    if parts.scheme == "ws" and not allow_insecure:
        raise ConnectError(
            "ws:// would send the token in clear; use wss:// (or --allow-insecure-ws)"
        )
    if not parts.hostname or parts.username or parts.password:
        raise ConnectError("the connect URL needs a host and no credentials")
    if parts.query or parts.fragment:
        raise ConnectError("the connect URL has no query or fragment")
    match = _CONNECT_PATH.match(parts.path)
    if match is None:
        raise ConnectError("the connect URL ends in /v1/sessions/<id>/connect")
    secure = parts.scheme == "wss"
    return ConnectTarget(
        url=url.strip(),
        secure=secure,
        host=parts.hostname,
        port=port or (443 if secure else 80),
        session_id=match.group("id"),
        token=token,
    )


def find_token(token_file: Path | None, environ: Mapping[str, str] = os.environ) -> str:
    """The session token from ``--token-file`` or, without it, ``TUNNEL_AGENT_TOKEN``."""
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            raise ConnectError(f"cannot read the token file {token_file}: {exc.strerror}") from None
        source = f"the token file {token_file}"
    else:
        token = environ.get(TOKEN_VARIABLE, "").strip()
        source = TOKEN_VARIABLE
        if not token:
            raise ConnectError(
                f"no token: set {TOKEN_VARIABLE} or use --token-file (never the command line)"
            )
    if not token or len(token) > MAX_TOKEN_CHARS or any(c.isspace() for c in token):
        raise ConnectError(f"{source} does not hold a token (one line, no spaces)")
    if not token.isascii() or not token.isprintable():
        raise ConnectError(f"{source} does not hold a token (printable ASCII only)")
    return token
