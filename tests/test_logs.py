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


SPECIAL_SECRETS = ('pa"ss\\wd1', "nl-first\nnl-second", "pässwörd-ünï", 'all"\\\n\u00e9\u4e2d')


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize("secret", SPECIAL_SECRETS)
def test_secrets_with_quotes_backslashes_newlines_and_non_ascii_are_masked(
    fmt: str, secret: str
) -> None:
    stream = io.StringIO()
    configure_logging("DEBUG", fmt, stream)  # type: ignore[arg-type]
    SECRETS.add(secret)
    try:
        log = EventLogger("tunnel_agent.test").bind(camera="lobby")
        log.warning("media.failed", reason=f"login with {secret} refused", url="rtsp://cam/x")
        logging.getLogger("third.party").error("raw %s record", secret)
        try:
            raise ValueError(f"bad password {secret}")
        except ValueError:
            logging.getLogger("third.party").exception("with traceback")
    finally:
        SECRETS.discard(secret)
        logging.getLogger().handlers.clear()
    output = stream.getvalue()
    lines = output.splitlines()
    assert len(lines) == 3, output  # one line per record, newlines in secrets included
    escaped_forms = {secret, json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1]}
    for form in escaped_forms:
        assert form not in output, (form, output)
    for piece in (p for p in secret.split("\n") if len(p) >= 4):
        assert piece not in output
    assert output.count("***") >= 3
    if fmt == "json":
        documents = [json.loads(line) for line in lines]
        assert documents[0]["reason"] == "login with *** refused"
        assert documents[1]["event"] == "raw *** record"
        assert "bad password ***" in documents[2]["error"]
    else:
        assert 'reason="login with *** refused"' in lines[0]
        assert "raw *** record" in lines[1]


def test_json_keeps_fields_named_like_its_own_keys() -> None:
    stream = io.StringIO()
    configure_logging("INFO", "json", stream)
    try:
        EventLogger("tunnel_agent.test", event="e").info(
            "twin.reported", ts=1, level="high", logger="x", error="none", field_ts=2
        )
    finally:
        logging.getLogger().handlers.clear()
    document = json.loads(stream.getvalue())
    assert (document["event"], document["level"], document["logger"]) == (
        "twin.reported",
        "INFO",
        "tunnel_agent.test",
    )
    assert document["field_ts"] == 1 and document["field_field_ts"] == 2
    assert document["field_level"] == "high"
    assert document["field_logger"] == "x"
    assert document["field_event"] == "e"
    assert document["field_error"] == "none"
