"""Mapping of WebSocket opening failures to answers (pure); real conditions: test_tunnel_errors."""

from __future__ import annotations

import socket
import ssl
from http import HTTPStatus

import pytest
from picows import WSInvalidStatusError, WSUpgradeResponse
from python_socks import ProxyConnectionError, ProxyError, ProxyTimeoutError

from tunnel_agent.tunnel import failures
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
        (TimeoutError(), 504, failures.MSG_TIMEOUT),
        (ProxyTimeoutError("t"), 504, failures.MSG_PROXY_TIMEOUT),
        (ProxyConnectionError(111, "refused"), 502, failures.MSG_PROXY_UNREACHABLE),
        (
            ProxyError("HTTP proxy rejected connection with status 407"),
            502,
            "Proxy authentication failed (HTTP 407)",
        ),
        (
            ProxyError("HTTP proxy rejected connection with status 403"),
            502,
            "Proxy refused the connection (HTTP 403)",
        ),
        (
            ProxyError("Username and password authentication failure"),
            502,
            "Proxy authentication failed (SOCKS)",
        ),
        (ProxyError("Connection refused by destination host", error_code=5), 502, "SOCKS reply 5"),
        (ssl.SSLCertVerificationError("bad cert"), 502, failures.MSG_TLS_VERIFY),
        (ssl.SSLError("handshake"), 502, failures.MSG_TLS),
        (socket.gaierror(-2, "Name or service not known"), 502, failures.MSG_DNS),
        (ConnectionRefusedError(111, "refused"), 502, failures.MSG_REFUSED),
        (ConnectionResetError(104, "reset"), 502, failures.MSG_CLOSED),
        (OSError(113, "no route"), 502, failures.MSG_UNREACHABLE),
        (RuntimeError("?"), 502, failures.MSG_OTHER),
    ],
)
def test_failures_map_to_status_and_message(exc: BaseException, status: int, message: str) -> None:
    error = websocket_failure(exc, TARGET)

    assert error.status == status
    assert error.body() == {"code": str(status), "target": TARGET, "message": error.message}
    assert message in error.message


def test_socket_failures_through_a_proxy_are_about_the_proxy() -> None:
    assert (
        websocket_failure(ConnectionRefusedError(), TARGET, via_proxy=True).message
        == failures.MSG_PROXY_UNREACHABLE
    )
    assert (
        websocket_failure(socket.gaierror(), TARGET, via_proxy=True).message
        == failures.MSG_PROXY_UNREACHABLE
    )
    assert (
        websocket_failure(ssl.SSLCertVerificationError(), TARGET, via_proxy=True).message
        == failures.MSG_TLS_VERIFY
    )


def test_library_messages_are_not_passed_through() -> None:
    error = websocket_failure(OSError(5, "wss://relay.example.net/t?sig=secret"), TARGET)
    assert "secret" not in error.message
