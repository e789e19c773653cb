"""tunnelOpen payload validation (pure): every rule, and a property test over arbitrary JSON."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunnel_agent.tunnel.errors import TunnelError
from tunnel_agent.tunnel.request import (
    MAX_TOKEN_BYTES,
    EndpointPolicy,
    TunnelRequest,
    parse_tunnel_request,
)
from tunnel_agent.tunnel.targets import CameraTarget, resolve_target

STRICT = EndpointPolicy()
VALID = {
    "remoteEndpoint": "wss://relay.example.net/v1/tunnels/abc?session=1",
    "remoteAuthorizationToken": "eyJhbGciOi.J9-_x",
    "localPort": 554,
}


def with_(**changes: Any) -> dict[str, Any]:
    payload = dict(VALID)
    for key, value in changes.items():
        if value is ...:
            payload.pop(key)
        else:
            payload[key] = value
    return payload


def refused(payload: object, policy: EndpointPolicy = STRICT) -> TunnelError:
    with pytest.raises(TunnelError) as caught:
        parse_tunnel_request(payload, policy)
    assert caught.value.status == 400
    assert caught.value.code == "400"
    return caught.value


def test_a_valid_request_is_parsed() -> None:
    request = parse_tunnel_request({**VALID, "somethingNew": True}, STRICT)

    assert request.local_port == 554
    assert request.token == VALID["remoteAuthorizationToken"]
    assert request.endpoint.host == "relay.example.net"
    assert request.endpoint.port == 443
    assert request.endpoint.display == "wss://relay.example.net/v1/tunnels/abc"
    assert "eyJ" not in repr(request)


@pytest.mark.parametrize(
    ("payload", "target", "fragment"),
    [
        (None, "payload", "JSON object"),
        ([VALID], "payload", "JSON object"),
        ("text", "payload", "JSON object"),
        (with_(remoteEndpoint=...), "remoteEndpoint", "required"),
        (with_(remoteEndpoint=5), "remoteEndpoint", "string"),
        (with_(remoteEndpoint=""), "remoteEndpoint", "empty"),
        (with_(remoteEndpoint="https://relay.example.net/"), "remoteEndpoint", "wss://"),
        (with_(remoteEndpoint="ws://relay.example.net/"), "remoteEndpoint", "not allowed"),
        (with_(remoteEndpoint="wss://"), "remoteEndpoint", "no host"),
        (with_(remoteEndpoint="wss://user:pw@relay.example.net/"), "remoteEndpoint", "credentials"),
        (with_(remoteEndpoint="wss://relay.example.net/#x"), "remoteEndpoint", "fragment"),
        (with_(remoteEndpoint="wss://relay.example.net:99999/"), "remoteEndpoint", "valid URL"),
        (with_(remoteEndpoint="wss://relay.example.net/a b"), "remoteEndpoint", "spaces"),
        (with_(remoteEndpoint="wss://relay.example.net/\r\nX: y"), "remoteEndpoint", "control"),
        (with_(remoteEndpoint="wss://[::1/"), "remoteEndpoint", "valid URL"),
        (with_(remoteEndpoint="wss://" + "a" * 5000), "remoteEndpoint", "longer"),
        (with_(remoteAuthorizationToken=...), "remoteAuthorizationToken", "required"),
        (with_(remoteAuthorizationToken=""), "remoteAuthorizationToken", "empty"),
        (with_(remoteAuthorizationToken="  "), "remoteAuthorizationToken", "empty"),
        (with_(remoteAuthorizationToken=42), "remoteAuthorizationToken", "string"),
        (with_(remoteAuthorizationToken="a\r\nInjected: 1"), "remoteAuthorizationToken", "control"),
        (with_(remoteAuthorizationToken="tok\x00en"), "remoteAuthorizationToken", "control"),
        (with_(remoteAuthorizationToken="t\u00f6ken"), "remoteAuthorizationToken", "ASCII"),
        (
            with_(remoteAuthorizationToken="x" * (MAX_TOKEN_BYTES + 1)),
            "remoteAuthorizationToken",
            "longer",
        ),
        (with_(localPort=...), "localPort", "required"),
        (with_(localPort="554"), "localPort", "integer"),
        (with_(localPort=554.0), "localPort", "integer"),
        (with_(localPort=True), "localPort", "integer"),
        (with_(localPort=0), "localPort", "between"),
        (with_(localPort=65536), "localPort", "between"),
        (with_(localPort=-1), "localPort", "between"),
    ],
)
def test_invalid_fields_are_refused_with_their_name(
    payload: object, target: str, fragment: str
) -> None:
    error = refused(payload)

    assert error.target == target
    assert fragment in error.message
    assert set(error.body()) == {"code", "target", "message"}


def test_the_largest_token_allowed_is_accepted() -> None:
    request = parse_tunnel_request(with_(remoteAuthorizationToken="x" * MAX_TOKEN_BYTES), STRICT)
    assert len(request.token) == MAX_TOKEN_BYTES


def test_ws_is_accepted_only_when_the_device_allows_it() -> None:
    request = parse_tunnel_request(
        with_(remoteEndpoint="ws://127.0.0.1:8080/t"), EndpointPolicy(allow_insecure_ws=True)
    )
    assert not request.endpoint.secure
    assert request.endpoint.port == 8080


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("relay.example.net", True),
        ("a.b.example.net", True),
        ("RELAY.Example.NET", True),
        ("example.net", False),
        ("example.net.evil.com", False),
        ("relay.example.org", False),
    ],
)
def test_allowed_remote_hosts_are_glob_patterns(host: str, allowed: bool) -> None:
    policy = EndpointPolicy(allowed_remote_hosts=("*.example.net",))
    payload = with_(remoteEndpoint=f"wss://{host}/t")
    if allowed:
        assert parse_tunnel_request(payload, policy).endpoint.host == host.lower()
    else:
        assert "not allowed" in refused(payload, policy).message


def test_error_messages_never_echo_the_query_string_or_the_token() -> None:
    secret = "query-secret-123"
    for payload in (
        with_(remoteEndpoint=f"wss://relay.example.net/?sig={secret}#frag"),
        with_(remoteEndpoint=f"https://relay.example.net/?sig={secret}"),
        with_(remoteAuthorizationToken=f"{secret}\n"),
    ):
        assert secret not in json.dumps(refused(payload).body())


def test_ipv6_endpoint_display_is_bracketed() -> None:
    request = parse_tunnel_request(with_(remoteEndpoint="wss://[::1]:8443/t?x=1"), STRICT)
    assert request.endpoint.display == "wss://[::1]:8443/t"
    assert request.endpoint.host == "::1"


def test_unknown_local_port_names_localhost() -> None:
    targets = [CameraTarget("lobby", "10.0.0.5", 554)]
    assert resolve_target(targets, 554).host == "10.0.0.5"
    with pytest.raises(TunnelError) as caught:
        resolve_target(targets, 8554)
    assert caught.value.body() == {
        "code": "400",
        "target": "localhost:8554",
        "message": "Local port is not available",
    }


# -- property test --------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=10,
)
endpoint_like = st.builds(
    lambda scheme, host, port, path, query: f"{scheme}{host}{port}{path}{query}",
    st.sampled_from(["wss://", "ws://", "https://", "", "wss:/", "WSS://"]),
    st.sampled_from(["relay.example.net", "127.0.0.1", "[::1]", "", "u:p@h", "h\u00e9.net", "a b"]),
    st.sampled_from(["", ":443", ":0", ":99999", ":x", ":8443"]),
    st.text(max_size=12),
    st.sampled_from(["", "?t=1", "#f", "?a=%00"]),
)
payloads = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {},
        optional={
            "remoteEndpoint": endpoint_like | json_values,
            "remoteAuthorizationToken": st.text(max_size=30) | json_values,
            "localPort": st.integers(-5, 70_000) | json_values,
        },
    ),
)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads, st.booleans())
def test_any_payload_gives_a_request_or_a_well_formed_400(payload: object, allow_ws: bool) -> None:
    policy = EndpointPolicy(allow_insecure_ws=allow_ws)
    targets = [CameraTarget("lobby", "127.0.0.1", 554)]
    try:
        request = parse_tunnel_request(payload, policy)
        target = resolve_target(targets, request.local_port)
    except TunnelError as error:
        body = error.body()
        assert error.status == 400
        assert set(body) == {"code", "target", "message"}
        assert all(isinstance(v, str) and v for v in body.values())
        json.dumps(body)
        return
    assert isinstance(request, TunnelRequest)
    assert request.endpoint.scheme in ("wss", "ws")
    assert request.token.isascii() and request.token.strip()
    assert target.port == request.local_port == 554


@pytest.mark.parametrize(
    ("host", "never"),
    [("relay.invalid", True), ("a.b.INVALID", True), ("invalid", True), ("invalid.example", False)],
)
def test_names_under_invalid_are_known_never_to_resolve(host: str, never: bool) -> None:
    request = parse_tunnel_request(with_(remoteEndpoint=f"wss://{host}/t"), STRICT)
    assert request.endpoint.never_resolves is never
