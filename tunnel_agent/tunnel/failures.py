"""Turn a failed WebSocket opening into the contract's error answer.

An HTTP rejection keeps the server's status (401 stays 401). Everything else is 502 (the far side
or the path to it failed) or 504 (it did not answer in time), with a fixed message naming the kind
of failure. Library messages are not passed through: they can carry URLs.
"""

from __future__ import annotations

import socket
import ssl
from http import HTTPStatus

from picows import WSError, WSHandshakeError
from python_socks import ProxyConnectionError, ProxyError, ProxyTimeoutError

from tunnel_agent.tunnel.errors import BAD_GATEWAY, GATEWAY_TIMEOUT, TunnelError

MSG_TIMEOUT = "Timed out opening the WebSocket"
MSG_DNS = "Could not resolve the remote endpoint host"
MSG_REFUSED = "Connection refused by the remote endpoint"
MSG_UNREACHABLE = "Could not connect to the remote endpoint"
MSG_TLS_VERIFY = "TLS certificate of the remote endpoint is not trusted"
MSG_TLS = "TLS handshake with the remote endpoint failed"
MSG_PROXY_UNREACHABLE = "Could not connect to the proxy"
MSG_PROXY_TIMEOUT = "Timed out connecting through the proxy"
MSG_PROXY_AUTH = "Proxy authentication failed"
MSG_PROXY_REFUSED = "Proxy refused the connection"
MSG_HANDSHAKE = "Invalid WebSocket handshake response"
MSG_CLOSED = "Remote endpoint closed the connection during the handshake"
MSG_OTHER = "WebSocket connection failed"

_PROXY_AUTH_STATUSES = {401, 407}
_FIRST_HTTP_STATUS = 100


def websocket_failure(exc: BaseException, target: str, *, via_proxy: bool = False) -> TunnelError:
    """The error answer for ``exc`` raised while opening the WebSocket to ``target``.

    Through a proxy the agent's own sockets only ever reach the proxy (which reports trouble
    further on as a status or a SOCKS reply), so a socket-level failure means the proxy.
    """
    if isinstance(exc, WSHandshakeError) and exc.response is not None:
        status = int(exc.response.status)
        if 300 <= status <= 599:
            return TunnelError(status, target, _reason_phrase(status))
        return TunnelError(BAD_GATEWAY, target, MSG_HANDSHAKE)
    if isinstance(exc, ProxyTimeoutError):
        return TunnelError(GATEWAY_TIMEOUT, target, MSG_PROXY_TIMEOUT)
    if isinstance(exc, TimeoutError):
        return TunnelError(GATEWAY_TIMEOUT, target, MSG_TIMEOUT)
    if isinstance(exc, ProxyConnectionError):
        return TunnelError(BAD_GATEWAY, target, MSG_PROXY_UNREACHABLE)
    if isinstance(exc, ProxyError):
        return TunnelError(BAD_GATEWAY, target, _proxy_message(exc))
    if via_proxy and _is_connect_failure(exc):
        return TunnelError(BAD_GATEWAY, target, MSG_PROXY_UNREACHABLE)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return TunnelError(BAD_GATEWAY, target, MSG_TLS_VERIFY)
    if isinstance(exc, ssl.SSLError):
        return TunnelError(BAD_GATEWAY, target, MSG_TLS)
    if isinstance(exc, socket.gaierror):
        return TunnelError(BAD_GATEWAY, target, MSG_DNS)
    if isinstance(exc, ConnectionRefusedError):
        return TunnelError(BAD_GATEWAY, target, MSG_REFUSED)
    if isinstance(exc, ConnectionResetError | BrokenPipeError | EOFError):
        return TunnelError(BAD_GATEWAY, target, MSG_CLOSED)
    if isinstance(exc, OSError):
        return TunnelError(BAD_GATEWAY, target, MSG_UNREACHABLE)
    if isinstance(exc, WSError):
        return TunnelError(BAD_GATEWAY, target, MSG_HANDSHAKE)
    return TunnelError(BAD_GATEWAY, target, MSG_OTHER)


def _is_connect_failure(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and not isinstance(
        exc, ssl.SSLError | ConnectionResetError | BrokenPipeError
    )


def _reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"


def _proxy_message(exc: ProxyError) -> str:
    """HTTP proxies answer with a status, SOCKS proxies with a reply code; both are safe to show.

    SOCKS reply codes are below 100 (SOCKS5: 1-8, SOCKS4: 91-93), HTTP statuses are not.
    """
    code = getattr(exc, "error_code", None)
    if isinstance(code, int) and code >= _FIRST_HTTP_STATUS:
        kind = MSG_PROXY_AUTH if code in _PROXY_AUTH_STATUSES else MSG_PROXY_REFUSED
        return f"{kind} (HTTP {code})"
    text = str(exc).lower()
    if "auth" in text or "password" in text:
        return f"{MSG_PROXY_AUTH} (SOCKS)"
    return f"{MSG_PROXY_REFUSED} (SOCKS reply {code})" if code else MSG_PROXY_REFUSED
