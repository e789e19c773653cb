"""Pure helpers: User-Agent, proxy parsing and choice, the DTDL model the code implements."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunnel_agent.config.proxy import InvalidProxy, parse_proxy_url
from tunnel_agent.tunnel import contract
from tunnel_agent.tunnel.proxy_choice import bypasses_proxy, choose_proxy
from tunnel_agent.tunnel.user_agent import PlatformInfo, build_user_agent

LINUX = PlatformInfo("Linux", "6.1.0-18-amd64", "x86_64")
DTDL = Path(__file__).resolve().parents[1] / "dtdl" / "WebSocketTunneling.json"


def test_user_agent_names_agent_platform_and_camera() -> None:
    assert build_user_agent("1.2.3", LINUX, "Contoso", "C-100") == (
        "tunnel-agent/1.2.3 (Linux 6.1.0-18-amd64; x86_64) Contoso/C-100"
    )
    assert build_user_agent("1.2.3", LINUX) == "tunnel-agent/1.2.3 (Linux 6.1.0-18-amd64; x86_64)"
    assert build_user_agent("1.2.3", LINUX, "Big Cam\r\nX: y", None).endswith(" Big-Cam-X-y")


def test_dtdl_model_matches_the_code() -> None:
    model = json.loads(DTDL.read_text())
    assert model["@id"] == contract.MODEL_ID
    (command,) = [c for c in model["contents"] if c["@type"] == "Command"]
    assert command["name"] == contract.TUNNEL_OPEN_METHOD
    fields = {f["name"]: f["schema"] for f in command["request"]["schema"]["fields"]}
    assert fields == {
        "remoteEndpoint": "string",
        "remoteAuthorizationToken": "string",
        "localPort": "integer",
    }
    assert tuple(fields) == contract.REQUEST_FIELDS


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "http://u:p%40ss@proxy:3128",
            ("http", "proxy", 3128, "u", "p@ss", "http://u:***@proxy:3128"),
        ),
        ("socks5h://proxy", ("socks5h", "proxy", 1080, None, None, "socks5h://proxy:1080")),
        ("socks5://[::1]:9050", ("socks5", "::1", 9050, None, None, "socks5://[::1]:9050")),
    ],
)
def test_proxy_urls_parse(url: str, expected: tuple[object, ...]) -> None:
    proxy = parse_proxy_url(url)
    assert (
        proxy.scheme,
        proxy.host,
        proxy.port,
        proxy.username,
        proxy.password,
        proxy.display,
    ) == expected


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://proxy", "scheme"),
        ("http://", "host is missing"),
        ("http://proxy/path", "path"),
        ("http://proxy:99999", "not a valid URL"),
        ("http://proxy?x=1", "query"),
    ],
)
def test_bad_proxy_urls_say_why(url: str, reason: str) -> None:
    with pytest.raises(InvalidProxy, match=reason):
        parse_proxy_url(url)


def test_socks5h_is_given_to_the_socks_library_as_socks5() -> None:
    assert parse_proxy_url("socks5h://u:p@h:1").url() == "socks5://u:p@h:1"


def test_configured_proxy_wins_and_environment_applies_otherwise() -> None:
    configured = parse_proxy_url("http://proxy:3128")
    env = {"HTTPS_PROXY": "http://envproxy:8080", "no_proxy": "internal.example.net,10.0.0.0/8"}

    assert choose_proxy("wss", "relay.example.net", configured, env) is configured
    chosen = choose_proxy("wss", "relay.example.net", None, env)
    assert chosen is not None and chosen.host == "envproxy"
    assert choose_proxy("wss", "a.internal.example.net", None, env) is None
    assert choose_proxy("wss", "10.1.2.3", None, env) is None
    assert choose_proxy("ws", "relay.example.net", None, env) is None
    assert choose_proxy("ws", "relay.example.net", None, {"http_proxy": "envproxy:1"}) is not None


@pytest.mark.parametrize(
    ("host", "no_proxy", "bypass"),
    [
        ("a.example.net", ".example.net", True),
        ("example.net", "example.net:443", True),
        ("notexample.net", "example.net", False),
        ("::1", "[::1]", True),
        ("192.168.1.9", "192.168.0.0/16", True),
        ("anything", "*", True),
    ],
)
def test_no_proxy_rules(host: str, no_proxy: str, bypass: bool) -> None:
    assert bypasses_proxy(host, no_proxy) is bypass
