"""The relay's pure pieces without sockets: sources and limits, tokens, sessions, refusal logging,
request heads, the connect command's arguments, and settings that must not read the token."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tunnel_agent.cloud.relay.front import parse_head
from tunnel_agent.cloud.relay.refusals import RefusalLog
from tunnel_agent.cloud.relay.sessions import (
    TOMBSTONE_S,
    SessionBook,
    SessionLimit,
    SessionRequest,
    Verdict,
    parse_session_request,
)
from tunnel_agent.cloud.relay.settings import RelaySettings
from tunnel_agent.cloud.relay.sources import (
    ConnectionLimits,
    FailureLimits,
    InvalidSources,
    TokenBucket,
    is_allowed,
    parse_networks,
    source_key,
)
from tunnel_agent.cloud.relay.tokens import TokenBook, bearer_token
from tunnel_agent.cloud.relay.tokens import Verdict as TunnelVerdict
from tunnel_agent.config.loading import load_any, load_settings
from tunnel_agent.consumer.target import ConnectError, find_token, parse_connect_url
from tunnel_agent.logs import EventLogger

SERVICE = "HostName=hub.example.net;SharedAccessKeyName=service;SharedAccessKey=" + "QUJD" * 11


def test_allow_lists_take_networks_and_refuse_host_bits() -> None:
    networks = parse_networks(["203.0.113.0/24", "2001:db8::/32", "198.51.100.7"])
    assert is_allowed("203.0.113.9", networks)
    assert is_allowed("::ffff:203.0.113.9", networks)  # IPv4 seen through a dual-stack socket
    assert is_allowed("2001:db8::1", networks)
    assert is_allowed("198.51.100.7", networks)
    assert not is_allowed("198.51.100.8", networks)
    assert not is_allowed("not an address", networks)
    with pytest.raises(InvalidSources, match=r"10\.0\.0\.1/8"):
        parse_networks(["10.0.0.1/8"])
    with pytest.raises(InvalidSources):
        parse_networks([24])


def test_ipv6_sources_are_counted_per_64() -> None:
    assert source_key("2001:db8:1:2:3:4:5:6") == source_key("2001:db8:1:2:ffff::1")
    assert source_key("2001:db8:1:3::1") != source_key("2001:db8:1:2::1")
    assert source_key("::ffff:192.0.2.1") == "192.0.2.1"


def test_a_token_bucket_allows_a_burst_then_its_rate() -> None:
    bucket = TokenBucket(burst=3, rate_per_s=1.0, tokens=3, updated_at=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(0.5)
    assert bucket.take(1.6)  # one token back after a second
    assert not bucket.take(1.7)
    assert bucket.full(10.0)


def test_connection_limits_cap_open_connections_and_their_rate_per_source() -> None:
    limits = ConnectionLimits(max_open=2, burst=3, rate_per_s=0.5)
    assert limits.admit("192.0.2.1", 0.0) is None
    assert limits.admit("192.0.2.1", 0.0) is None
    assert limits.admit("192.0.2.1", 0.0) == "too many connections from this source"
    assert limits.admit("192.0.2.2", 0.0) is None  # another source has its own
    limits.release("192.0.2.1")
    assert limits.admit("192.0.2.1", 0.0) is None  # the third token of the burst
    limits.release("192.0.2.1")
    assert limits.admit("192.0.2.1", 0.1) == "new connections too fast"
    assert limits.admit("192.0.2.1", 2.1) is None  # refilled at 0.5/s


def test_failure_limits_block_a_source_after_a_burst() -> None:
    failures = FailureLimits(burst=3, rate_per_s=0.1)
    for _ in range(3):
        assert not failures.blocked("192.0.2.1", 0.0)
        failures.failed("192.0.2.1", 0.0)
    assert failures.blocked("192.0.2.1", 0.0)
    assert not failures.blocked("192.0.2.2", 0.0)
    assert not failures.blocked("192.0.2.1", 10.5)


def test_refusals_are_all_counted_but_logged_once_per_window(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = RefusalLog(EventLogger("tunnel_agent.relay.test"), window_s=3600)
    with caplog.at_level(logging.WARNING, "tunnel_agent.relay.test"):
        for _ in range(50):
            log.refused("source not allowed", "192.0.2.1", route="r")
        log.refused("source not allowed", "192.0.2.2", route="r")
        log.refused("new connections too fast", "192.0.2.1", route="r")
    assert log.counts == {"source not allowed": 51, "new connections too fast": 1}
    assert len(caplog.records) == 3


def test_a_repeated_refusal_says_how_many_went_unlogged(caplog: pytest.LogCaptureFixture) -> None:
    log = RefusalLog(EventLogger("tunnel_agent.relay.test"), window_s=0.0)
    log._last[("wrong API key", "192.0.2.1")] = (-1e9, 7)  # seven since the last line, long ago
    with caplog.at_level(logging.WARNING, "tunnel_agent.relay.test"):
        log.refused("wrong API key", "192.0.2.1")
    assert caplog.records[-1].fields["not_logged_since"] == 7  # type: ignore[attr-defined]


def test_tunnel_tokens_are_single_use_and_expire() -> None:
    book = TokenBook(ttl_s=10)
    tunnel_id, token = book.mint(0.0)
    assert len(token) == 43  # 256 bits, URL-safe base64 without padding
    assert book.redeem(tunnel_id, "wrong", 1.0) is TunnelVerdict.WRONG
    assert book.redeem(tunnel_id, None, 1.0) is TunnelVerdict.WRONG
    assert book.redeem("other", token, 1.0) is TunnelVerdict.UNKNOWN
    assert book.redeem(tunnel_id, token, 1.0) is TunnelVerdict.ACCEPTED
    assert book.redeem(tunnel_id, token, 1.0) is TunnelVerdict.USED
    late_id, late = book.mint(0.0)
    assert book.redeem(late_id, late, 10.5) is TunnelVerdict.EXPIRED
    book.purge(100.0)
    assert len(book) == 0


def test_bearer_tokens_are_read_strictly() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer ") is None
    assert bearer_token(None) is None


def request(**fields: object) -> SessionRequest:
    return parse_session_request({"deviceId": "cam", "localPort": 554, **fields})


def test_session_tokens_are_checked_for_token_expiry_and_source() -> None:
    book = SessionBook(max_sessions=2)
    session, token = book.create(request(ttl=60), "192.0.2.1", now=1000.0, now_mono=0.0)
    limited, limited_token = book.create(
        request(allowedSources=["198.51.100.0/24"]), "192.0.2.1", now=1000.0, now_mono=0.0
    )
    assert book.check(session.id, token, "203.0.113.1", 1.0) == (Verdict.ACCEPTED, session)
    assert book.check(session.id, _altered(token), "192.0.2.1", 1.0)[0] is Verdict.WRONG_TOKEN
    assert book.check(session.id, token, "192.0.2.1", 60.0)[0] is Verdict.EXPIRED
    assert book.check(limited.id, limited_token, "192.0.2.1", 1.0)[0] is Verdict.SOURCE
    assert book.check(limited.id, limited_token, "198.51.100.9", 1.0)[0] is Verdict.ACCEPTED
    assert book.check("nope", token, "192.0.2.1", 1.0) == (Verdict.UNKNOWN, None)
    assert session.expires_at_iso == "1970-01-01T00:17:40Z"
    assert [str(n) for n in session.allowed_sources] == ["192.0.2.1/32"]
    with pytest.raises(SessionLimit):
        book.create(request(), "192.0.2.1", now=1000.0, now_mono=0.0)


def test_an_ended_session_leaves_a_tombstone_that_says_why() -> None:
    book = SessionBook(max_sessions=5)
    revoked, token = book.create(request(), "192.0.2.1", now=0.0, now_mono=0.0)
    expired, _ = book.create(request(), "192.0.2.1", now=0.0, now_mono=0.0)
    book.end(revoked.id, Verdict.REVOKED, 1.0)
    book.end(expired.id, Verdict.EXPIRED, 1.0)
    assert book.check(revoked.id, token, "192.0.2.1", 2.0) == (Verdict.REVOKED, None)
    assert book.check(expired.id, None, "192.0.2.1", 2.0) == (Verdict.EXPIRED, None)
    later, _ = book.create(request(), "192.0.2.1", now=0.0, now_mono=0.0)
    book.end(later.id, Verdict.REVOKED, 1.0 + TOMBSTONE_S + 1)  # tombstones age out as others end
    assert book.check(revoked.id, token, "192.0.2.1", 2.0 + TOMBSTONE_S) == (Verdict.UNKNOWN, None)
    assert book.end("nothing", Verdict.REVOKED, 2.0) is None
    assert len(book) == 0


def test_verdicts_carry_the_status_the_consumer_gets() -> None:
    statuses = {v: v.status for v in Verdict}
    assert statuses == {
        Verdict.ACCEPTED: 200,
        Verdict.UNKNOWN: 404,
        Verdict.WRONG_TOKEN: 401,
        Verdict.EXPIRED: 401,
        Verdict.REVOKED: 401,
        Verdict.SOURCE: 403,
    }


def test_request_heads_are_routed_by_path_and_upgrade() -> None:
    head = parse_head(b"GET /v1/tunnels/abc?x=1 HTTP/1.1\r\nHost: r\r\nUpgrade: WebSocket")
    assert head is not None and head.path == b"/v1/tunnels/abc" and head.websocket
    plain = parse_head(b"POST /v1/sessions HTTP/1.1\r\nHost: r")
    assert plain is not None and not plain.websocket and plain.method == b"POST"
    assert parse_head(b"\x16\x03\x01 garbage") is None


def test_the_connect_url_is_checked() -> None:
    target = parse_connect_url(
        "wss://relay.example.net/v1/sessions/0123abcd/connect", "s3cr3t", allow_insecure=False
    )
    assert (target.host, target.port, target.session_id) == ("relay.example.net", 443, "0123abcd")
    assert target.session_url == "https://relay.example.net:443/v1/sessions/0123abcd"
    assert "s3cr3t" not in repr(target)
    bad = {
        "https://relay/v1/sessions/a/connect": "wss://",
        "ws://relay/v1/sessions/a/connect": "in clear",
        "wss://user:pw@relay/v1/sessions/a/connect": "credentials",
        "wss://relay/v1/sessions/a/connect?x=1": "query",
        "wss://relay/v1/tunnels/a": "ends in /v1/sessions",
    }
    for url, reason in bad.items():
        with pytest.raises(ConnectError, match=reason):
            parse_connect_url(url, "t", allow_insecure=False)
    assert parse_connect_url(
        "ws://127.0.0.1:8080/v1/sessions/a/connect", "t", allow_insecure=True
    ).session_url == ("http://127.0.0.1:8080/v1/sessions/a")


def test_the_token_comes_from_the_environment_or_a_file(tmp_path: Path) -> None:
    assert find_token(None, {"TUNNEL_AGENT_TOKEN": " abc \n"}) == "abc"
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert find_token(token_file, {"TUNNEL_AGENT_TOKEN": "env"}) == "from-file"
    with pytest.raises(ConnectError, match="TUNNEL_AGENT_TOKEN"):
        find_token(None, {})
    with pytest.raises(ConnectError, match="cannot read"):
        find_token(tmp_path / "missing", {})
    token_file.write_text("two words")
    with pytest.raises(ConnectError, match="no spaces"):
        find_token(token_file, {})


def test_run_and_relay_settings_do_not_take_the_connect_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "consumer-token-not-a-setting-0123456789"
    monkeypatch.setenv("TUNNEL_AGENT_TOKEN", secret)
    relay_toml = tmp_path / "relay.toml"
    relay_toml.write_text(
        '[relay]\nallow_insecure_ws = true\npublic_url = "ws://127.0.0.1:8443"\n'
        f'[iothub]\nservice_connection_string = "{SERVICE}"\n'
    )
    agent_toml = tmp_path / "agent.toml"
    agent_toml.write_text('[[cameras]]\nname = "lobby"\nports = [554]\n')

    relay = load_any(RelaySettings, relay_toml, ())
    agent = load_settings(agent_toml)

    for settings in (relay, agent):
        dumped = settings.model_dump(mode="json")
        assert secret not in str(dumped)
        assert "token" not in type(settings).model_fields
    assert relay.relay.api_key is None


def test_a_session_address_names_a_host_consumers_can_reach() -> None:
    def settings(**relay: object) -> RelaySettings:
        return RelaySettings.model_validate(
            {
                "relay": {"allow_insecure_ws": True, "public_url": "ws://relay-0.example.net"}
                | relay,
                "iothub": {"service_connection_string": SERVICE},
            }
        )

    assert settings().relay.session_address_host == "127.0.0.1"
    assert settings(session_host="0.0.0.0").relay.session_address_host == "relay-0.example.net"
    assert (
        settings(session_host="0.0.0.0", session_public_host="10.1.2.3").relay.session_address_host
        == "10.1.2.3"
    )


def _altered(token: str) -> str:
    """The token with its first character changed (a random token may already start with "x")."""
    return ("y" if token.startswith("x") else "x") + token[1:]
