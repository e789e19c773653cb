"""The one authenticated request ``connect`` makes before it listens: is this session usable?

``GET /v1/sessions/<id>`` with the session's token, on the same path (proxy, TLS) the tunnels
will take, so that a wrong token, a revoked or expired session, a source the session does not
allow, an untrusted certificate or an unreachable relay is reported at once, not on the first
connection. A plain HTTP/1.1 request over asyncio streams: python-socks (already used for the
agent's proxies) opens the way through a proxy, which aiohttp cannot do for SOCKS.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import dataclass
from typing import Any

from python_socks.async_.asyncio import Proxy

from tunnel_agent.config.proxy import ProxyAddress
from tunnel_agent.consumer.target import ConnectError, ConnectTarget
from tunnel_agent.tunnel.failures import websocket_failure

MAX_ANSWER_BYTES = 64 * 1024
_WHAT = {
    401: "the relay refused the token",
    403: "the relay refused this source",
    404: "the relay has no such session",
    429: "the relay is limiting this source",
}


@dataclass(frozen=True)
class SessionInfo:
    device_id: str
    local_port: int
    expires_at: str


async def check_session(
    target: ConnectTarget,
    proxy: ProxyAddress | None,
    tls: ssl.SSLContext,
    user_agent: str,
    timeout_s: float,
) -> SessionInfo:
    try:
        async with asyncio.timeout(timeout_s):
            status, body = await _get(target, proxy, tls, user_agent)
    except ConnectError:
        raise
    except Exception as exc:
        failure = websocket_failure(exc, target.display, via_proxy=proxy is not None)
        raise ConnectError(f"cannot reach the relay: {failure.message}") from None
    document = _json(body)
    reason = document.get("error") if isinstance(document.get("error"), str) else None
    if status != 200:
        what = _WHAT.get(status, f"the relay answered {status}")
        raise ConnectError(f"{what}: {reason}" if reason else what)
    try:
        return SessionInfo(
            str(document["deviceId"]), int(document["localPort"]), str(document["expiresAt"])
        )
    except (KeyError, TypeError, ValueError):
        raise ConnectError("the relay's answer is not a session") from None


async def _get(
    target: ConnectTarget, proxy: ProxyAddress | None, tls: ssl.SSLContext, user_agent: str
) -> tuple[int, bytes]:
    context = tls if target.secure else None
    hostname = target.host if target.secure else None
    if proxy is not None:
        way = Proxy.from_url(proxy.url(), rdns=proxy.scheme == "socks5h")
        sock = await way.connect(target.host, target.port)
        reader, writer = await asyncio.open_connection(
            sock=sock, ssl=context, server_hostname=hostname
        )
    else:
        reader, writer = await asyncio.open_connection(
            target.host, target.port, ssl=context, server_hostname=hostname
        )
    try:
        url = target.session_url
        path = url[url.index("/", url.index("//") + 2) :]
        host = f"[{target.host}]" if ":" in target.host else target.host
        writer.write(
            (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{target.port}\r\n"
                f"Authorization: Bearer {target.token}\r\nUser-Agent: {user_agent}\r\n"
                "Accept: application/json\r\nConnection: close\r\n\r\n"
            ).encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise ConnectError("the relay did not answer with HTTP")
        length = _content_length(lines)
        if length is not None:
            body = await reader.readexactly(min(length, MAX_ANSWER_BYTES))
        else:
            body = await reader.read(MAX_ANSWER_BYTES)
        return int(parts[1]), body
    finally:
        writer.close()


def _content_length(lines: list[str]) -> int | None:
    for line in lines:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length" and value.strip().isdigit():
            return int(value.strip())
    return None


def _json(body: bytes) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}
