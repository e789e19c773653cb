"""The RTSP publishing client against a scripted media server on the test's own loop: the
handshake it sends, keep-alives at half the session timeout, TEARDOWN on close, and errors that
say what the server did without naming the password."""

from __future__ import annotations

import asyncio
import socket

import pytest

from tests.support.waiting import until
from tunnel_agent.rtsp.publisher import PublishError, RtspPublisher


async def read_request(
    reader: asyncio.StreamReader, first: bytes = b""
) -> tuple[str, dict[str, str], bytes]:
    """(method, headers by lower-case name, body) of the next RTSP request; ``first`` is a byte
    of it already read."""
    lines = (first + await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = {
        k.strip().lower(): v.strip()
        for k, _, v in (line.partition(":") for line in lines[1:] if line)
    }
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return lines[0].split(" ", 1)[0], headers, body


class ScriptedServer:
    """Answers every request with ``status`` (SETUP with a 2 s session), keeps what it got."""

    def __init__(self, status: int = 200, keepalive_status: int = 200) -> None:
        self.status = status
        self.keepalive_status = keepalive_status
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.frames = 0

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        sock: socket.socket = self._server.sockets[0]
        return int(sock.getsockname()[1])

    def methods(self) -> list[str]:
        return [method for method, _, _ in self.requests]

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                first = await reader.readexactly(1)
                if first == b"$":  # an interleaved frame
                    head = await reader.readexactly(3)
                    await reader.readexactly(int.from_bytes(head[1:3], "big"))
                    self.frames += 1
                    continue
                method, headers, body = await read_request(reader, first)
                self.requests.append((method, headers, body))
                status = self.status
                if method in ("OPTIONS", "GET_PARAMETER") and "RECORD" in self.methods():
                    status = self.keepalive_status
                extra = "Public: OPTIONS, ANNOUNCE, SETUP, RECORD, TEARDOWN\r\n"
                if status == 401:
                    extra = 'WWW-Authenticate: Basic realm="media"\r\n'
                elif method == "SETUP":
                    extra = "Session: 42;timeout=2\r\nTransport: RTP/AVP/TCP;interleaved=0-1\r\n"
                writer.write(
                    f"RTSP/1.0 {status} X\r\nCSeq: {headers['cseq']}\r\n{extra}\r\n".encode()
                )
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        self._server.close()


async def test_a_session_is_announced_kept_alive_and_torn_down() -> None:
    server = ScriptedServer(keepalive_status=405)  # refused keep-alives still keep it
    port = await server.start()
    publisher = RtspPublisher(f"rtsp://127.0.0.1:{port}/live", request_timeout_s=2.0)
    try:
        await publisher.connect("127.0.0.1", port)
        await publisher.record("v=0\r\n")
        assert publisher.write_bounded
        # Session timeout 2 s: a keep-alive each second, OPTIONS as GET_PARAMETER is not public.
        await until(lambda: server.methods().count("OPTIONS") >= 3, timeout_s=10)
        assert publisher.error is None and publisher.recording
        assert publisher.send(b"$\x00\x00\x00")
        await until(lambda: server.frames == 1)
    finally:
        await publisher.close()
        server.close()
    assert server.methods()[:4] == ["OPTIONS", "ANNOUNCE", "SETUP", "RECORD"]
    assert server.methods()[-1] == "TEARDOWN"
    _, announce, sdp = server.requests[1]
    assert announce["content-type"] == "application/sdp" and sdp == b"v=0\r\n"
    _, setup, _ = server.requests[2]
    assert setup["transport"] == "RTP/AVP/TCP;unicast;interleaved=0-1;mode=record"
    assert setup["cseq"] == "3" and "session" not in setup
    assert all(h.get("session") == "42" for _, h, _ in server.requests[3:])
    assert not publisher.send(b"$\x00\x00\x00")  # closed: refused, not raised


@pytest.mark.parametrize(
    ("status", "username", "reason"),
    [
        (401, None, "the media server asks for credentials and none were given"),
        (401, "pub", "the media server refused the credentials"),
        (404, None, "the media server answered OPTIONS with 404 X"),
    ],
)
async def test_a_refused_session_says_why(status: int, username: str | None, reason: str) -> None:
    server = ScriptedServer(status)
    port = await server.start()
    publisher = RtspPublisher(
        f"rtsp://127.0.0.1:{port}/live", username=username, password="S3cret-Pub"
    )
    try:
        await publisher.connect("127.0.0.1", port)
        with pytest.raises(PublishError) as caught:
            await publisher.record("v=0\r\n")
    finally:
        publisher.abort("done")
        server.close()
    assert str(caught.value) == reason
    authorized = [h for _, h, _ in server.requests if "authorization" in h]
    assert len(authorized) == (1 if username else 0)  # credentials only after a challenge


async def test_a_server_that_never_answers_is_given_up_on_in_time() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    publisher = RtspPublisher(f"rtsp://127.0.0.1:{port}/live", request_timeout_s=0.5)
    try:
        await publisher.connect("127.0.0.1", port)  # the kernel accepts; no one ever reads
        with pytest.raises(PublishError, match="did not answer OPTIONS in time"):
            async with asyncio.timeout(5):
                await publisher.record("v=0\r\n")
    finally:
        publisher.abort("done")
        listener.close()
