"""Watching a camera in the browser through the relay, in real headless Chromium.

The whole path is real: devhub (IoT Hub emulator) -> agent -> gst-rtsp-server camera, the relay
calling ``tunnelOpen``, PyAV remuxing to fragmented MP4, MSE in Chromium. Browsers are started once
per module (two of them, for the two-viewer tests) and pages are reopened per test.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import av
import pytest
from aiohttp import web

from tests.conftest import camera_entry
from tests.support.agent import AgentRunner
from tests.support.browser import Browser, available
from tests.support.camera import RtspCamera
from tests.support.net import free_port, fresh_loopback_ip
from tests.support.threadloop import ThreadLoop
from tests.support.waiting import until
from tunnel_agent.cloud.devhub.hub import DevHub
from tunnel_agent.cloud.relay.runner import RunningRelay, start_relay
from tunnel_agent.cloud.relay.settings import RelaySettings
from tunnel_agent.cloud.relay.view.watch import ViewLimits, WatchTarget
from tunnel_agent.cloud.relay.view.web import ViewService, ViewSession

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not available(), reason="needs Debian's chromium and chromium-driver"),
]
API_KEY = "view-api-key-0123456789"
CAMERA_SIZE = (640, 360)
LIMITS = ViewLimits(
    grace_s=2.0,
    queue_bytes=256 * 1024,
    socket_send_buffer_bytes=64 * 1024,
    send_stall_s=3.0,
    retry_max_s=4.0,
)


class RawRecords(logging.Handler):
    """Log records as produced, before scrubbing: proof that tokens are never logged."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name} {record.getMessage()} {getattr(record, 'fields', '')}")

    def events(self, name: str) -> list[str]:
        return [line for line in self.lines if f" {name} " in line]


@dataclass
class Bed:
    folder: Path
    devhub: DevHub
    relay: RunningRelay
    agent: AgentRunner
    camera: RtspCamera
    h265_camera: RtspCamera
    servers: ThreadLoop
    records: RawRecords
    view: ViewService
    view_port: int
    routes: dict[str, Any] = field(default_factory=dict)
    sessions: dict[str, ViewSession] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.view_port}"

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.devhub.ca.cert_file))

    def session(
        self, route: str, *, rtsp_path: str = "/test", expires_in_s: float | None = 600
    ) -> tuple[str, str]:
        """A watchable session on one of the relay's routes: (session id, token)."""
        session_id = base64.b32encode(os.urandom(5)).decode().lower()
        token = base64.urlsafe_b64encode(os.urandom(24)).decode()
        relay_route = self.routes[route]
        target = WatchTarget(session_id, relay_route.device_id, relay_route.local_port, rtsp_path)

        async def join(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            local = await self.relay.relay.open_local_port(relay_route)
            try:
                far_reader, far_writer = await asyncio.open_connection(local.host, local.port)
            except OSError:
                local.close()
                return
            await _copy_both_ways(reader, writer, far_reader, far_writer)

        expires_at = None if expires_in_s is None else time.time() + expires_in_s
        self.sessions[session_id] = ViewSession(target, token, expires_at, join)
        return session_id, token

    def view_url(self, session_id: str, token: str) -> str:
        return f"{self.base}/v1/sessions/{session_id}/view#token={token}"

    def tunnels_opened(self) -> int:
        """tunnelOpen calls the device answered (opened, repeated or failed), from its own log."""
        events = ("tunnel.opened", "tunnel.open_repeated", "tunnel.open_failed")
        return sum(len(self.agent.events(name)) for name in events)


async def _copy_both_ways(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    far_reader: asyncio.StreamReader,
    far_writer: asyncio.StreamWriter,
) -> None:
    """Join the view's loopback connection to the relay's local tunnel port, until either ends."""

    async def copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()

    tasks = [
        asyncio.create_task(copy(reader, far_writer)),
        asyncio.create_task(copy(far_reader, writer)),
    ]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        far_writer.close()


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory, servers: ThreadLoop) -> Iterator[Bed]:
    folder = tmp_path_factory.mktemp("view")
    records = RawRecords()
    logging.getLogger().addHandler(records)
    logging.getLogger().setLevel(logging.INFO)
    camera = RtspCamera(folder / "camera")
    h265_camera = RtspCamera(folder / "camera-h265", extra=["--codec", "h265"])
    hub_host = fresh_loopback_ip()
    devhub = DevHub(folder / "devhub", f"{hub_host}:{free_port(hub_host)}")
    servers.run(devhub.start())
    devhub.add_device("view-cam")
    devhub.add_device("view-offline")
    agent = AgentRunner(
        folder / "agent",
        {
            "hub": {
                "connection_string": devhub.connection_string("view-cam"),
                "ca_file": str(devhub.ca.cert_file),
            },
            "tunnel": {"ca_file": str(devhub.ca.cert_file)},
            "cameras": [camera_entry(camera), camera_entry(h265_camera, name="hevc")],
        },
    )
    relay_port = free_port()
    tls = devhub.ca.issue("relay", ["127.0.0.1"])
    route_ports = {"cam": free_port(), "hevc": free_port(), "offline": free_port()}
    settings = RelaySettings.model_validate(
        {
            "relay": {
                "listen": f"127.0.0.1:{relay_port}",
                "public_url": f"wss://127.0.0.1:{relay_port}",
                "metrics_listen": f"127.0.0.1:{free_port()}",
                "cert_file": tls.cert_file,
                "key_file": tls.key_file,
                "api_key": API_KEY,
                "method_timeout": 5,
            },
            "iothub": {
                "service_connection_string": devhub.service_connection_string,
                "ca_file": devhub.ca.cert_file,
            },
            "routes": [
                {
                    "listen": f"127.0.0.1:{route_ports['cam']}",
                    "device_id": "view-cam",
                    "local_port": camera.port,
                    "name": "cam",
                },
                {
                    "listen": f"127.0.0.1:{route_ports['hevc']}",
                    "device_id": "view-cam",
                    "local_port": h265_camera.port,
                    "name": "hevc",
                },
                {
                    "listen": f"127.0.0.1:{route_ports['offline']}",
                    "device_id": "view-offline",
                    "local_port": 554,
                    "name": "offline",
                },
            ],
        }
    )
    relay = servers.run(start_relay(settings))
    sessions: dict[str, ViewSession] = {}
    view = ViewService(sessions.get, LIMITS)
    view_port = free_port()

    async def serve() -> web.AppRunner:
        app = web.Application()
        view.add_routes(app)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls.cert_file, tls.key_file)
        await web.TCPSite(runner, "127.0.0.1", view_port, ssl_context=context).start()
        return runner

    runner = servers.run(serve())
    agent.wait_connected()
    servers.run(devhub.wait_device("view-cam", 20))
    bed = Bed(folder, devhub, relay, agent, camera, h265_camera, servers, records, view, view_port)
    bed.routes = dict(relay.relay.routes)
    bed.sessions = sessions
    yield bed
    servers.run(view.close())
    servers.run(runner.cleanup())
    agent.stop()
    servers.run(relay.stop())
    servers.run(devhub.stop())
    bed.camera.stop()
    h265_camera.stop()
    logging.getLogger().removeHandler(records)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = Browser(ignore_certificate_errors=True)
    yield chromium
    chromium.close()


@pytest.fixture(scope="module")
def second_browser() -> Iterator[Browser]:
    chromium = Browser(ignore_certificate_errors=True)
    yield chromium
    chromium.close()


@pytest.fixture
def blank(browser: Browser, second_browser: Browser) -> Iterator[None]:
    """Each test leaves both browsers on a blank page, so no viewer outlives its test."""
    yield
    for chromium in (browser, second_browser):
        chromium.open("about:blank")


def test_the_page_plays_the_camera(bed: Bed, browser: Browser, blank: None, tmp_path: Path) -> None:
    session_id, token = bed.session("cam")

    browser.open(bed.view_url(session_id, token))
    first, last = browser.wait_playing(3.0)

    assert (last["width"], last["height"]) == CAMERA_SIZE
    assert last["currentTime"] - first["currentTime"] >= 3.0
    shown = browser.wait(lambda s: s["shownViewers"] == "1" and "kbit/s" in s["shownBitrate"])
    assert shown["shownResolution"] == "640 x 360" and shown["shownState"] == "live"
    assert "#token" not in browser.driver.current_url  # moved out of the address bar
    screenshot = browser.screenshot(tmp_path / "playing.png")
    print(f"screenshot of the playing page: {screenshot}")
    problems = [e["message"] for e in browser.driver.get_log("browser") if e["level"] == "SEVERE"]
    assert problems == []  # no CSP violation, no failed resource
    assert not any(token in line for line in bed.records.lines)


def test_two_viewers_share_one_tunnel(
    bed: Bed, browser: Browser, second_browser: Browser, blank: None
) -> None:
    session_id, token = bed.session("cam")
    before = bed.tunnels_opened()

    browser.open(bed.view_url(session_id, token))
    browser.wait_playing(1.0)
    second_browser.open(bed.view_url(session_id, token))
    second_browser.wait_playing(3.0)
    browser.wait_playing(3.0)

    for chromium in (browser, second_browser):
        assert chromium.wait(lambda s: s["shownViewers"] == "2")["width"] == CAMERA_SIZE[0]
    assert bed.tunnels_opened() == before + 1
    assert bed.view.watches[session_id].gate.connections == 1


def test_wrong_or_expired_token_shows_why_and_opens_no_tunnel(
    bed: Bed, browser: Browser, blank: None
) -> None:
    session_id, token = bed.session("cam")
    expired_id, expired_token = bed.session("cam", expires_in_s=-1)
    before = bed.tunnels_opened()

    browser.open(bed.view_url(session_id, token[:-4] + "AAAA"))
    refused = browser.wait(lambda s: s["error"] == "refused")
    browser.open(bed.view_url(expired_id, expired_token))
    expired = browser.wait(lambda s: s["error"] == "expired")

    assert "not valid" in refused["shownMessage"]
    assert "expired" in expired["shownMessage"]
    assert session_id not in bed.view.watches and expired_id not in bed.view.watches
    assert bed.tunnels_opened() == before
    assert len(bed.records.events("view.viewer_refused")) >= 2


def test_the_page_plays_again_after_a_camera_restart(
    bed: Bed, browser: Browser, blank: None
) -> None:
    session_id, token = bed.session("cam")
    browser.open(bed.view_url(session_id, token))
    playing = browser.wait_playing(1.0)[1]

    port = bed.camera.port
    bed.camera.stop()
    browser.wait(lambda s: s["state"] != "live" or "unavailable" in s["shownState"], 30)
    bed.camera = RtspCamera(bed.folder / "camera", port=port)
    again = browser.wait(lambda s: (s["generation"] or 0) > playing["generation"], 60)
    start = again["currentTime"]
    browser.wait(lambda s: s["currentTime"] >= start + 2.0 and s["width"] == CAMERA_SIZE[0], 30)

    assert again["connects"] == playing["connects"]  # same page, same WebSocket: no reload


class SilentViewer:
    """A viewer that authenticates and then never reads: a raw socket with a tiny buffer."""

    def __init__(self, host: str, port: int, path: str, token: str, tls: ssl.SSLContext) -> None:
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.connect((host, port))
        self.sock = tls.wrap_socket(raw, server_hostname=host)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += self.sock.recv(1)
        assert answer.startswith(b"HTTP/1.1 101"), answer
        payload = json.dumps({"type": "auth", "token": token}).encode()
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)

    def close(self) -> None:
        self.sock.close()


def test_a_viewer_that_stops_reading_does_not_stall_another(
    bed: Bed, browser: Browser, blank: None
) -> None:
    session_id, token = bed.session("cam")
    browser.open(bed.view_url(session_id, token))
    browser.wait_playing(1.0)
    left_before = len(bed.records.events("view.viewer_left"))

    silent = SilentViewer(
        "127.0.0.1", bed.view_port, f"/v1/sessions/{session_id}/live", token, bed.tls()
    )
    try:
        browser.wait(lambda s: s["shownViewers"] == "2")
        first, last = browser.wait_playing(4.0)
        deadline = time.monotonic() + 60
        while not [
            line
            for line in bed.records.events("view.viewer_left")[left_before:]
            if "too slow" in line or "socket stalled" in line
        ]:
            assert time.monotonic() < deadline, bed.records.events("view.viewer_left")
            time.sleep(0.2)
        after = browser.wait_playing(2.0)[1]
    finally:
        silent.close()

    assert last["currentTime"] - first["currentTime"] >= 4.0
    assert after["width"] == CAMERA_SIZE[0] and after["state"] == "live"
    assert bed.records.events("view.viewer_behind") or bed.records.events("view.viewer_left")


async def test_snapshot_answers_a_jpeg_of_the_camera_size(bed: Bed) -> None:
    session_id, token = bed.session("cam")
    url = f"{bed.base}/v1/sessions/{session_id}/snapshot.jpg"
    async with aiohttp.ClientSession() as client:
        async with client.get(url, ssl=bed.tls()) as response:
            assert response.status == 401
        bad = {"Authorization": "Bearer not-the-token"}
        async with client.get(url, headers=bad, ssl=bed.tls()) as response:
            assert response.status == 401
        good = {"Authorization": f"Bearer {token}"}
        async with client.get(url, headers=good, ssl=bed.tls()) as response:
            assert response.status == 200
            assert response.content_type == "image/jpeg"
            jpeg = await response.read()

    path = Path(bed.folder) / f"snapshot-{session_id}.jpg"
    path.write_bytes(jpeg)
    with av.open(str(path)) as image:
        frame = next(image.decode(video=0))
    assert (frame.width, frame.height) == CAMERA_SIZE


def test_h265_the_browser_cannot_play_is_explained(bed: Bed, browser: Browser, blank: None) -> None:
    supported = browser.run(
        "return MediaSource.isTypeSupported('video/mp4; codecs=\"hvc1.1.6.L63.90\"')"
    )
    session_id, token = bed.session("hevc")

    browser.open(bed.view_url(session_id, token))
    if supported:
        browser.wait_playing(2.0)
    else:
        shown = browser.wait(lambda s: s["error"] == "unsupported")
        assert "H.265" in shown["shownMessage"] and "cannot play" in shown["shownMessage"]


async def test_pages_carry_a_strict_content_security_policy(bed: Bed) -> None:
    async with aiohttp.ClientSession() as client:
        for path in ("/", "/v1/sessions/x/view", "/static/view/view.js"):
            async with client.get(bed.base + path, ssl=bed.tls()) as response:
                assert response.status == 200
                policy = response.headers["Content-Security-Policy"]
                assert "default-src 'none'" in policy and "script-src 'self'" in policy
                assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
                assert response.headers["X-Content-Type-Options"] == "nosniff"
                assert response.headers["Referrer-Policy"] == "no-referrer"
        for path in ("/static/view/..%2fweb.py", "/static/view/view.html", "/static/view/x.js"):
            async with client.get(bed.base + path, ssl=bed.tls()) as response:
                assert response.status == 404


async def test_session_end_closes_its_viewers_watch(bed: Bed) -> None:
    session_id, token = bed.session("cam")
    url = f"wss://127.0.0.1:{bed.view_port}/v1/sessions/{session_id}/live"
    async with aiohttp.ClientSession() as client, client.ws_connect(url, ssl=bed.tls()) as ws:
        await ws.send_str(json.dumps({"type": "auth", "token": token}))
        first = json.loads((await ws.receive(timeout=10)).data)
        assert first["type"] == "status"
        await until(lambda: session_id in bed.view.watches, timeout_s=10)
        await bed.servers.call(bed.view.session_closed(session_id))
        while (message := await ws.receive(timeout=10)).type == aiohttp.WSMsgType.BINARY or (
            message.type == aiohttp.WSMsgType.TEXT and '"error"' not in message.data
        ):
            pass
        assert message.type == aiohttp.WSMsgType.TEXT and "session closed" in message.data
    assert session_id not in bed.view.watches
