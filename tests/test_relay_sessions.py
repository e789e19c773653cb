"""Sessions: consumer tokens, ttl, allowed sources, revocation, and ``tunnel-agent connect``.

Real components throughout: the devhub, a real agent with the synthetic camera, the relay on the
shared background loop, ``tunnel-agent connect`` as a child process, PyAV and aiohttp as
consumers. Refused consumers must never cause a ``tunnelOpen``: the agent's own log is the
witness, and each "nothing happened" is followed by a good request whose call does show up.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest

from tests.support.camera import RtspCamera
from tests.support.relay_bed import (
    API_KEY,
    ConnectProcess,
    RelayBed,
    call_api,
    create_session,
    start_bed,
    wait_closed,
)
from tests.support.threadloop import ThreadLoop
from tests.support.waiting import until
from tests.test_tunnel_video import decode_frames
from tunnel_agent.cloud.relay.runner import RunningRelay

OPTIONS = b"OPTIONS rtsp://camera/test RTSP/1.0\r\nCSeq: 1\r\n\r\n"


@pytest.fixture(scope="module")
def bed(
    tmp_path_factory: pytest.TempPathFactory, servers: ThreadLoop, camera: RtspCamera
) -> Iterator[RelayBed]:
    bed = start_bed(tmp_path_factory.mktemp("sessions"), servers, {"plain": camera})
    yield bed
    bed.close()


@pytest.fixture(scope="module")
def relay(bed: RelayBed) -> RunningRelay:
    # Every consumer here comes from loopback, many per test: the limits have tests of their own.
    return bed.start_relay(
        max_connections_per_source=64,
        new_connections_burst=500,
        new_connections_per_second=100,
        auth_failures_burst=1000,  # wrong tokens on purpose, all from 127.0.0.1
    )


async def websocket_status(
    bed: RelayBed, url: str, token: str | None, source: str | None = None
) -> int:
    """The status of a consumer WebSocket upgrade (101 when accepted, then closed at once)."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    connector = aiohttp.TCPConnector(ssl=bed.tls(), local_addr=(source, 0) if source else None)
    async with aiohttp.ClientSession(connector=connector) as http:
        try:
            async with http.ws_connect(url, headers=headers) as ws:
                await ws.close()
                return 101
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status


async def rtsp_options_over_websocket(bed: RelayBed, url: str, token: str) -> bytes:
    """What the camera answers to OPTIONS, sent through a consumer WebSocket."""
    connector = aiohttp.TCPConnector(ssl=bed.tls())
    async with (
        aiohttp.ClientSession(connector=connector) as http,
        http.ws_connect(url, headers={"Authorization": f"Bearer {token}"}) as ws,
    ):
        await ws.send_bytes(OPTIONS)
        message = await asyncio.wait_for(ws.receive(), 15)
        assert message.type == aiohttp.WSMsgType.BINARY, message
        return message.data  # type: ignore[no-any-return]


async def test_a_session_answer_has_every_field_and_a_256_bit_token(
    bed: RelayBed, relay: RunningRelay
) -> None:
    before = time.time()
    session = await create_session(bed, relay, ttl=600)

    assert set(session) >= {"id", "deviceId", "localPort", "address", "token", "connectUrl"}
    assert len(base64.urlsafe_b64decode(session["token"] + "=")) == 32
    assert session["connectUrl"] == (
        f"wss://127.0.0.1:{relay.port}/v1/sessions/{session['id']}/connect"
    )
    assert session["expiresAt"].endswith("Z")
    expires = datetime.fromisoformat(session["expiresAt"].replace("Z", "+00:00"))
    assert expires.tzinfo == UTC
    assert before + 598 <= expires.timestamp() <= time.time() + 601
    assert session["allowedSources"] == ["127.0.0.1/32"]  # the caller's own address
    assert session["protocol"] == "rtsp"
    host, port = session["address"].rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    status, listed = await call_api(bed, relay, "GET", "/v1/sessions")
    assert status == 200
    assert session["id"] in {s["id"] for s in listed["sessions"]}
    assert all("token" not in s for s in listed["sessions"])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"localPort": 554}, "deviceId"),
        ({"deviceId": "d", "localPort": 0}, "localPort"),
        ({"deviceId": "d", "localPort": 554, "ttl": 0}, "ttl"),
        ({"deviceId": "d", "localPort": 554, "ttl": 86_401}, "ttl"),
        ({"deviceId": "d", "localPort": 554, "ttl": "60"}, "ttl"),
        ({"deviceId": "d", "localPort": 554, "ttl": True}, "ttl"),
        ({"deviceId": "d", "localPort": 554, "allowedSources": []}, "allowedSources"),
        ({"deviceId": "d", "localPort": 554, "allowedSources": "10.0.0.0/8"}, "allowedSources"),
        ({"deviceId": "d", "localPort": 554, "allowedSources": ["10.0.0.1/8"]}, "10.0.0.1/8"),
        ({"deviceId": "d", "localPort": 554, "protocol": "udp"}, "protocol"),
    ],
)
async def test_a_session_request_is_checked_field_by_field(
    bed: RelayBed, relay: RunningRelay, body: dict[str, object], message: str
) -> None:
    status, answer = await call_api(bed, relay, "POST", "/v1/sessions", body=body)

    assert status == 400
    assert message in answer["error"]


async def test_the_session_api_needs_the_key(bed: RelayBed, relay: RunningRelay) -> None:
    body = {"deviceId": "agent-cam", "localPort": bed.camera_port()}
    for token in (None, "wrong-key-wrong-key", API_KEY + "x"):
        status, _ = await call_api(bed, relay, "POST", "/v1/sessions", body=body, token=token)
        assert status == 401
    status, _ = await call_api(bed, relay, "GET", "/v1/sessions", token="nope-nope-nope-nope")
    assert status == 401


async def test_the_session_address_admits_only_its_sources(
    bed: RelayBed, relay: RunningRelay
) -> None:
    mine = await create_session(bed, relay)
    theirs = await create_session(bed, relay, allowedSources=["127.0.0.3/32"])
    host, port = mine["address"].rsplit(":", 1)
    calls = bed.device_calls()
    refused = relay.relay.refusals.counts["source not allowed"]

    reader, writer = await asyncio.open_connection(host, int(port), local_addr=("127.0.0.3", 0))
    assert await wait_closed(reader, 5) == b""  # closed at once
    writer.close()
    their_host, their_port = theirs["address"].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(their_host, int(their_port))
    assert await wait_closed(reader, 5) == b""
    writer.close()

    assert relay.relay.refusals.counts["source not allowed"] == refused + 2
    sizes = await asyncio.to_thread(decode_frames, f"rtsp://{host}:{port}/test", 3)
    assert sizes == [(640, 360)] * 3
    await until(lambda: bed.device_calls() == calls + 1, timeout_s=10)  # only the good one


async def test_connect_with_a_good_token_plays_the_camera(
    bed: RelayBed, relay: RunningRelay, tmp_path: Path
) -> None:
    session = await create_session(bed, relay)
    connect = ConnectProcess(tmp_path, session["connectUrl"], session["token"], bed.ca_file)
    try:
        connect.wait_listening()
        url = f"rtsp://127.0.0.1:{connect.port}/test"
        with ThreadPoolExecutor(2) as pool:
            loop = asyncio.get_running_loop()
            results = await asyncio.gather(
                *(loop.run_in_executor(pool, decode_frames, url, 10) for _ in range(2))
            )
        assert results == [[(640, 360)] * 10] * 2
        output = connect.process.wait_for(lambda out: out.count(": open") >= 2, 10)
        assert f"for session {session['id']}" in output
        assert session["expiresAt"] in output
        assert "connection 1 from 127.0.0.1:" in output and "connection 2 from" in output
    finally:
        assert connect.stop() == 0
    assert session["token"] not in connect.output()


@pytest.mark.parametrize("case", ["wrong token", "expired", "revoked", "unknown", "source"])
async def test_connect_will_not_start_on_a_refused_session(
    bed: RelayBed, relay: RunningRelay, tmp_path: Path, case: str
) -> None:
    session = await create_session(
        bed,
        relay,
        ttl=1 if case == "expired" else 600,
        **({"allowedSources": ["192.0.2.0/24"]} if case == "source" else {}),
    )
    url, token = session["connectUrl"], session["token"]
    if case == "wrong token":
        token = secrets.token_urlsafe(32)
    elif case == "expired":
        await until(lambda: session["id"] not in relay.relay.sessions.sessions, timeout_s=5)
    elif case == "revoked":
        status, _ = await call_api(bed, relay, "DELETE", f"/v1/sessions/{session['id']}")
        assert status == 204
    elif case == "unknown":
        url = url.replace(session["id"], secrets.token_hex(8))
    calls = bed.device_calls()

    connect = ConnectProcess(tmp_path, url, token, bed.ca_file)
    assert connect.wait_exit() == 1
    output = connect.output()

    expected = {
        "wrong token": "the relay refused the token: wrong token",
        "expired": "the relay refused the token: session expired",
        "revoked": "the relay refused the token: session revoked",
        "unknown": "the relay has no such session",
        "source": "the relay refused this source: source not allowed",
    }
    assert expected[case] in output
    assert "listening on" not in output and token not in output
    assert bed.device_calls() == calls


@pytest.mark.parametrize("case", ["wrong token", "no token", "expired", "revoked", "unknown"])
async def test_a_refused_consumer_websocket_causes_no_tunnel_open(
    bed: RelayBed, relay: RunningRelay, case: str
) -> None:
    session = await create_session(bed, relay, ttl=1 if case == "expired" else 600)
    url, token = session["connectUrl"], session["token"]
    if case == "expired":
        await until(lambda: session["id"] not in relay.relay.sessions.sessions, timeout_s=5)
    elif case == "revoked":
        await call_api(bed, relay, "DELETE", f"/v1/sessions/{session['id']}")
    good = await create_session(bed, relay)
    calls = bed.device_calls()

    presented = {"wrong token": secrets.token_urlsafe(32), "no token": None}.get(case, token)
    if case == "unknown":
        url = url.replace(session["id"], secrets.token_hex(8))
    status = await websocket_status(bed, url, presented)

    assert status == (404 if case == "unknown" else 401)
    answer = await rtsp_options_over_websocket(bed, good["connectUrl"], good["token"])
    assert answer.startswith(b"RTSP/1.0 200 OK")
    await until(lambda: bed.device_calls() >= calls + 1, timeout_s=10)
    assert bed.device_calls() == calls + 1  # the good one only


async def test_allowed_sources_also_apply_to_consumer_websockets_when_given(
    bed: RelayBed, relay: RunningRelay
) -> None:
    limited = await create_session(bed, relay, allowedSources=["127.0.0.5/32"])
    default = await create_session(bed, relay)

    assert await websocket_status(bed, limited["connectUrl"], limited["token"]) == 403
    assert await websocket_status(bed, limited["connectUrl"], limited["token"], "127.0.0.5") == 101
    # Not given: the token alone admits a WebSocket from anywhere, the TCP address only its creator.
    assert await websocket_status(bed, default["connectUrl"], default["token"], "127.0.0.7") == 101
    host, port = default["address"].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port), local_addr=("127.0.0.7", 0))
    assert await wait_closed(reader, 5) == b""
    writer.close()


async def test_revoking_a_session_closes_its_tunnels_and_later_connections(
    bed: RelayBed, relay: RunningRelay, tmp_path: Path
) -> None:
    session = await create_session(bed, relay)
    connect = ConnectProcess(tmp_path, session["connectUrl"], session["token"], bed.ca_file)
    try:
        connect.wait_listening()
        host, port = session["address"].rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(OPTIONS)
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)).startswith(b"RTSP/1.0")

        status, _ = await call_api(bed, relay, "DELETE", f"/v1/sessions/{session['id']}")

        assert status == 204
        await wait_closed(reader, 5)
        writer.close()
        await until(lambda: any(r.reason == "session revoked" for r in relay.relay.history))
        later_reader, later_writer = await asyncio.open_connection("127.0.0.1", connect.port)
        assert await wait_closed(later_reader, 10) == b""
        later_writer.close()
        connect.process.wait_for(lambda out: "refused (401: session revoked)" in out, 10)
        with pytest.raises(OSError):
            await asyncio.open_connection(host, int(port))
        status, _ = await call_api(bed, relay, "DELETE", f"/v1/sessions/{session['id']}")
        assert status == 404
    finally:
        connect.stop()


async def test_an_expired_session_is_removed(bed: RelayBed, relay: RunningRelay) -> None:
    session = await create_session(bed, relay, ttl=1)
    host, port = session["address"].rsplit(":", 1)

    await until(lambda: session["id"] not in relay.relay.sessions.sessions, timeout_s=5)

    status, answer = await call_api(
        bed, relay, "GET", f"/v1/sessions/{session['id']}", token=session["token"]
    )
    assert (status, answer["error"]) == (401, "session expired")
    status, listed = await call_api(bed, relay, "GET", "/v1/sessions")
    assert session["id"] not in {s["id"] for s in listed["sessions"]}
    with pytest.raises(OSError):
        await asyncio.open_connection(host, int(port))


async def test_a_session_is_looked_up_with_its_own_token(
    bed: RelayBed, relay: RunningRelay
) -> None:
    session = await create_session(bed, relay)
    path = f"/v1/sessions/{session['id']}"

    status, answer = await call_api(bed, relay, "GET", path, token=session["token"])
    assert status == 200 and answer["id"] == session["id"] and "token" not in answer
    status, _ = await call_api(bed, relay, "GET", path, token=secrets.token_urlsafe(32))
    assert status == 401


async def test_no_token_or_key_reaches_a_log(
    bed: RelayBed, relay: RunningRelay, tmp_path: Path
) -> None:
    session = await create_session(bed, relay)
    await websocket_status(bed, session["connectUrl"], session["token"])
    await websocket_status(bed, session["connectUrl"], _altered(session["token"]))
    await until(lambda: not relay.relay.tunnels, timeout_s=10)

    text = bed.records.text() + bed.agent.output()
    assert session["token"] not in text and session["token"][1:] not in text
    assert API_KEY not in text
    assert "Bearer " not in text


def _altered(token: str) -> str:
    """The token with its first character changed (a random token may already start with "x")."""
    return ("y" if token.startswith("x") else "x") + token[1:]
