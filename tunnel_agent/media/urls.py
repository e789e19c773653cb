"""Media source URLs: what kind of source, how to open it, and how to show it safely."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from tunnel_agent.config.urls import InvalidUrl, parse_url


class SourceKind(enum.Enum):
    RTSP = "rtsp"
    HTTP_SNAPSHOT = "http"
    FILE = "file"
    FOLDER = "folder"
    V4L2 = "v4l2"


NETWORK_SCHEMES = ("rtsp", "rtsps", "http", "https")


class InvalidSource(ValueError):
    """The camera url cannot be used; the message never repeats credentials."""


@dataclass(frozen=True)
class SourceAddress:
    """A parsed camera ``url``. ``open_url`` carries credentials; ``display`` never does."""

    kind: SourceKind
    open_url: str = field(repr=False)
    display: str
    path: Path | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)


def parse_source(
    url: str, username: str | None = None, password: str | None = None
) -> SourceAddress:
    """A camera ``url`` checked and classified; InvalidSource says what is wrong with it."""
    text = url.strip()
    scheme = text.partition(":")[0].lower()
    if scheme in NETWORK_SCHEMES:
        try:
            parsed = parse_url(text, NETWORK_SCHEMES)
        except InvalidUrl as exc:
            raise InvalidSource(f"{scheme} URL: {exc}") from None
        user = username if username is not None else parsed.username
        secret = password if password is not None else parsed.password
        kind = SourceKind.RTSP if parsed.scheme.startswith("rtsp") else SourceKind.HTTP_SNAPSHOT
        open_url = with_credentials(text, user, secret)
        return SourceAddress(kind, open_url, redact_url(text), None, user, secret)
    if scheme == "file":
        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            raise InvalidSource("file URL names a host: use file:///path")
        path = Path(unquote(parts.path))
        if not path.is_absolute():
            raise InvalidSource("file URL needs an absolute path: file:///path")
        if str(path).startswith("/dev/"):
            return SourceAddress(SourceKind.V4L2, str(path), f"file://{path}", path)
        if text.endswith("/"):
            return SourceAddress(SourceKind.FOLDER, str(path), f"file://{path}/", path)
        return SourceAddress(SourceKind.FILE, str(path), f"file://{path}", path)
    raise InvalidSource("url must be rtsp://, rtsps://, http(s)://, or file:///")


def with_credentials(url: str, username: str | None, password: str | None) -> str:
    """``url`` with ``username:password@`` in its authority (percent-encoded)."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    if username:
        auth = quote(username, safe="")
        if password:
            auth += ":" + quote(password, safe="")
        netloc = f"{auth}@{netloc}"
    return urlunsplit(parts._replace(netloc=netloc))


def redact_url(url: str) -> str:
    """The URL without its password and query string, for logs and errors."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in userinfo else f"{user}@{host}"
    query = "***" if parts.query else ""
    return urlunsplit(parts._replace(netloc=netloc, query=query, fragment=""))


def without_credentials(url: str) -> str:
    """The URL without ``user:password@`` (HTTP sources send them in a header instead)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]))


def rtsp_input_options(url: str, ca_file: Path | None, read_timeout_s: float) -> dict[str, str]:
    """FFmpeg options to read an RTSP(S) camera: interleaved TCP, a read deadline, and for RTSPS
    the certificate verified (FFmpeg does not unless told), against ``ca_file`` or the system
    store. The running agent and ``tunnel-agent snapshot`` both open cameras with these."""
    options = {"rtsp_transport": "tcp", "timeout": str(int(read_timeout_s * 1_000_000))}
    if url.lower().startswith("rtsps://"):
        options["tls_verify"] = "1"
        if ca_file is not None:
            options["ca_file"] = str(ca_file)
    return options
