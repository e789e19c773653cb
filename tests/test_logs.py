"""Log lines: one per event, structured, and scrubbed of secrets whatever produced them."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from tunnel_agent.logs import SECRETS, EventLogger, configure_logging, redact_text


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging("DEBUG", "text", stream)
    yield stream
    logging.getLogger().handlers.clear()


@pytest.mark.parametrize(
    ("text", "hidden"),
    [
        ("proxy http://user:hunter2@proxy:3128 failed", "hunter2"),
        ("GET wss://relay.example.net/t?sig=abcdef&se=1 401", "sig=abcdef"),
        ("HostName=h;DeviceId=d;SharedAccessKey=c2VjcmV0a2V5", "c2VjcmV0a2V5"),
        ("SharedAccessSignature sr=h&sig=AbCd%2BEf&se=1", "AbCd%2BEf"),
        ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.payload", "eyJhbGciOiJIUzI1NiJ9"),
    ],
)
def test_patterns_are_redacted(text: str, hidden: str) -> None:
    assert hidden not in redact_text(text)
    assert "***" in redact_text(text)


def test_registered_secrets_are_scrubbed_until_discarded() -> None:
    SECRETS.add("token-one-two-three")
    try:
        assert redact_text("x token-one-two-three y") == "x *** y"
    finally:
        SECRETS.discard("token-one-two-three")
    assert redact_text("x token-one-two-three y") == "x token-one-two-three y"


def test_text_lines_carry_bound_fields_and_quote_spaces(captured: io.StringIO) -> None:
    log = EventLogger("tunnel_agent.test").bind(tunnel="abc123")
    log.info("tunnel.closed", reason="camera closed", bytes_to_remote=10, duration_s=1.23456)

    line = captured.getvalue()
    assert line.count("\n") == 1
    assert (
        " INFO tunnel_agent.test tunnel.closed tunnel=abc123"
        ' reason="camera closed" bytes_to_remote=10 duration_s=1.235' in line
    )


def test_json_lines_are_objects(captured: io.StringIO) -> None:
    stream = io.StringIO()
    configure_logging("INFO", "json", stream)
    EventLogger("tunnel_agent.test").warning("hub.disconnected", url="wss://h/p?sig=1")

    document = json.loads(stream.getvalue())
    assert document["event"] == "hub.disconnected"
    assert document["level"] == "WARNING"
    assert document["url"] == "wss://h/p?***"


def test_third_party_records_are_scrubbed_and_kept_on_one_line(captured: io.StringIO) -> None:
    SECRETS.add("camera-password-9")
    try:
        logging.getLogger("tunnel_agent.other").warning(
            "failed\nrtsp://admin:camera-password-9@cam/x"
        )
    finally:
        SECRETS.discard("camera-password-9")
    line = captured.getvalue()
    assert "camera-password-9" not in line
    assert line.count("\n") == 1
