"""Mapping of WebSocket opening failures to answers (pure); real conditions: test_tunnel_errors."""

from __future__ import annotations

import socket
import ssl
from http import HTTPStatus

import pytest
from picows import WSInvalidStatusError, WSUpgradeResponse
from python_socks import ProxyConnectionError, ProxyError, ProxyTimeoutError

from tunnel_agent.tunnel.failures import websocket_failure

TARGET = "wss://relay.example.net/t"


def rejected(status: int) -> WSInvalidStatusError:
    response = WSUpgradeResponse.create_error_response(500)
    response.status = HTTPStatus(status)
    return WSInvalidStatusError("rejected", response=response)


@pytest.mark.parametrize(
    ("exc", "status", "message"),
    [
        (rejected(401), 401, "Unauthorized"),
        (rejected(403), 403, "Forbidden"),
        (rejected(500), 500, "Internal Server Error"),
        (rejected(302), 302, "Found"),
        (TimeoutError(), 504, "Timed out opening the WebSocket"),
        (ProxyTimeoutError("t"), 504, "Timed out connecting through the proxy"),
        (ProxyConnectionError(111, "refused"), 502, "Could not connect to the proxy"),
        (
            ProxyError("407 Proxy Authentication Required", error_code=407),
            502,
            "Proxy authentication failed (HTTP 407)",
        ),
        (
            ProxyError("403 Access violation", error_code=403),
            502,
            "Proxy refused the connection (HTTP 403)",
        ),
        (
            ProxyError("Username and password authentication failure"),
            502,
            "Proxy authentication failed (SOCKS)",
        ),
        (
            ProxyError("Connection refused by destination host", error_code=5),
            502,
            "Proxy refused the connection (SOCKS reply 5)",
        ),
        (
            ssl.SSLCertVerificationError("bad cert"),
            502,
            "TLS certificate of the remote endpoint is not trusted",
        ),
        (ssl.SSLError("handshake"), 502, "TLS handshake with the remote endpoint failed"),
        (
            socket.gaierror(-2, "Name or service not known"),
            502,
            "Could not resolve the remote endpoint host",
        ),
        (ConnectionRefusedError(111, "refused"), 502, "Connection refused by the remote endpoint"),
        (
            ConnectionResetError(104, "reset"),
            502,
            "Remote endpoint closed the connection during the handshake",
        ),
        (OSError(113, "no route"), 502, "Could not connect to the remote endpoint"),
        (RuntimeError("?"), 502, "WebSocket connection failed"),
    ],
)
def test_failures_map_to_status_and_message(exc: BaseException, status: int, message: str) -> None:
    error = websocket_failure(exc, TARGET)

    assert error.status == status
    assert error.body() == {"code": str(status), "target": TARGET, "message": message}


def test_socket_failures_through_a_proxy_are_about_the_proxy() -> None:
    assert (
        websocket_failure(ConnectionRefusedError(), TARGET, via_proxy=True).message
        == "Could not connect to the proxy"
    )
    assert (
        websocket_failure(socket.gaierror(), TARGET, via_proxy=True).message
        == "Could not connect to the proxy"
    )
    assert (
        websocket_failure(ssl.SSLCertVerificationError(), TARGET, via_proxy=True).message
        == "TLS certificate of the remote endpoint is not trusted"
    )


def test_library_messages_are_not_passed_through() -> None:
    error = websocket_failure(OSError(5, "wss://relay.example.net/t?sig=secret"), TARGET)
    assert "secret" not in error.message
