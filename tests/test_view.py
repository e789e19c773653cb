"""Watching a camera in the browser through the relay, in real headless Chromium.

The whole path is real: devhub (IoT Hub emulator) -> agent -> gst-rtsp-server camera, the relay
with its session API calling ``tunnelOpen``, PyAV remuxing to fragmented MP4, MSE in Chromium.
Sessions are made through ``POST /v1/sessions`` as a user makes them, and the page is opened from
the ``viewUrl`` of the answer. Browsers are started once per module (two of them, for the
two-viewer tests) and pages are reopened per test.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import av
import pytest

from tests.support.browser import Browser, available
from tests.support.camera import RtspCamera
from tests.support.processes import dying_with_parent, group_members
from tests.support.relay_bed import (
    AGENT_DEVICE,
    API_KEY,
    OFFLINE_DEVICE,
    RelayBed,
    call_api,
    start_bed,
)
from tests.support.threadloop import ThreadLoop
from tests.support.waiting import until
from tunnel_agent.cloud.relay.runner import RunningRelay
from tunnel_agent.cloud.relay.sessions import Verdict
from tunnel_agent.cloud.relay.view.extension import ViewExtension

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not available(), reason="needs Debian's chromium and chromium-driver"),
]
CAMERA_SIZE = (640, 360)
CAMERA_PASSWORD = "cam-Pa55-word"


@dataclass
class Bed:
    cloud: RelayBed
    relay: RunningRelay

    @property
    def view(self) -> ViewExtension:
        return next(e for e in self.relay.extensions if isinstance(e, ViewExtension))

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.relay.port}"

    @property
    def camera(self) -> RtspCamera:
        return self.cloud.cameras["plain"]

    def tls(self) -> ssl.SSLContext:
        return self.cloud.tls()

    def api(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        return self.cloud.servers.run(call_api(self.cloud, self.relay, method, path, **kwargs))

    def session(self, camera: str = "plain", **body: Any) -> dict[str, Any]:
        """A session made through the API, as the index page or a script makes it."""
        fields = {
            "deviceId": AGENT_DEVICE,
            "localPort": self.cloud.camera_port(camera),
            "rtspPath": "/test",
            **body,
        }
        status, answer = self.api("POST", "/v1/sessions", body=fields)
        assert status == 201, answer
        return answer  # type: ignore[no-any-return]

    def tunnels_opened(self) -> int:
        """tunnelOpen calls the device answered (opened, repeated or failed), from its own log."""
        return self.cloud.device_calls()


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory, servers: ThreadLoop) -> Iterator[Bed]:
    folder = tmp_path_factory.mktemp("view")
    cameras = {
        "plain": RtspCamera(folder / "camera"),
        "hevc": RtspCamera(folder / "camera-h265", extra=["--codec", "h265"]),
        "digest": RtspCamera(
            folder / "camera-digest", user="viewer", password=CAMERA_PASSWORD, auth="digest"
        ),
    }
    cloud = start_bed(folder, servers, cameras)
    relay = cloud.start_relay(
        view_grace_period=2.0,
        max_viewers_per_session=3,
        # Many viewers and wrong tokens from 127.0.0.1 on purpose: the limits have own tests.
        max_connections_per_source=64,
        new_connections_burst=500,
        new_connections_per_second=100,
        auth_failures_burst=1000,
    )
    bed = Bed(cloud, relay)
    # Smaller than the defaults, so that a silent viewer and a camera restart show up sooner.
    service = bed.view.service
    service.limits = dataclasses.replace(
        service.limits,
        queue_bytes=256 * 1024,
        socket_send_buffer_bytes=64 * 1024,
        send_stall_s=3.0,
        retry_max_s=4.0,
    )
    yield bed
    cloud.close()
    for camera in cameras.values():
        camera.stop()


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


@pytest.fixture(autouse=True)
def _no_watch_outlives_its_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """A watch lingers for its grace period after its last viewer, and one still retrying a
    camera opens tunnels that the next test would count as its own: each test's watches are
    closed when it ends (after ``blank`` has taken the browsers off their pages)."""
    yield
    if "bed" not in request.fixturenames:
        return
    bed: Bed = request.getfixturevalue("bed")
    relay = bed.relay.relay
    bed.cloud.servers.run(bed.view.service.close())
    bed.cloud.servers.run(until(lambda: not bed.view.service.watches and not relay.tunnels, 15))


def test_the_page_plays_the_camera(bed: Bed, browser: Browser, blank: None, tmp_path: Path) -> None:
    session = bed.session()
    assert session["viewUrl"] == (
        f"{bed.base}/v1/sessions/{session['id']}/view#token={session['token']}"
    )

    browser.open(session["viewUrl"])
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
    assert not any(session["token"] in line for line in bed.cloud.records.lines)


def test_two_viewers_share_one_tunnel(
    bed: Bed, browser: Browser, second_browser: Browser, blank: None
) -> None:
    session = bed.session()
    before = bed.tunnels_opened()

    browser.open(session["viewUrl"])
    browser.wait_playing(1.0)
    second_browser.open(session["viewUrl"])
    second_browser.wait_playing(3.0)
    browser.wait_playing(3.0)

    for chromium in (browser, second_browser):
        assert chromium.wait(lambda s: s["shownViewers"] == "2")["width"] == CAMERA_SIZE[0]
    assert bed.tunnels_opened() == before + 1
    assert bed.view.service.watches[session["id"]].links_opened == 1


def test_refused_expired_and_revoked_links_say_why_and_open_no_tunnel(
    bed: Bed, browser: Browser, blank: None
) -> None:
    good = bed.session()
    expiring = bed.session(ttl=1)
    revoked = bed.session()
    assert bed.api("DELETE", f"/v1/sessions/{revoked['id']}")[0] == 204
    relay = bed.relay.relay
    until_expired = time.monotonic() + 10
    while relay.sessions.check(expiring["id"], None, "", time.monotonic())[0] != Verdict.EXPIRED:
        assert time.monotonic() < until_expired, "the session never expired"
        time.sleep(0.1)
    before = bed.tunnels_opened()

    browser.open(good["viewUrl"].replace(good["token"], good["token"][:-4] + "AAAA"))
    refused = browser.wait(lambda s: s["error"] == "refused")
    browser.open(expiring["viewUrl"])
    expired = browser.wait(lambda s: s["error"] == "expired")
    browser.open(revoked["viewUrl"])
    ended = browser.wait(lambda s: s["error"] == "revoked")

    assert "not valid" in refused["shownMessage"]
    assert "expired" in expired["shownMessage"]
    assert "revoked" in ended["shownMessage"]
    assert not set(bed.view.service.watches) & {good["id"], expiring["id"], revoked["id"]}
    assert bed.tunnels_opened() == before
    assert len(bed.cloud.records.events("view.viewer_refused")) >= 3


def test_an_offline_device_is_explained(bed: Bed, browser: Browser, blank: None) -> None:
    session = bed.session(deviceId=OFFLINE_DEVICE, localPort=554)

    browser.open(session["viewUrl"])
    shown = browser.wait(lambda s: "offline" in (s["shownMessage"] or ""), 30)

    assert "the device is offline" in shown["shownMessage"] and shown["width"] == 0


def test_a_camera_without_that_stream_is_explained(bed: Bed, browser: Browser, blank: None) -> None:
    session = bed.session(rtspPath="/no-such-stream")

    browser.open(session["viewUrl"])
    shown = browser.wait(lambda s: "no stream at this path" in (s["shownMessage"] or ""), 30)

    assert shown["width"] == 0 and "Retrying" in shown["shownMessage"]


def test_the_page_plays_again_after_a_camera_restart(
    bed: Bed, browser: Browser, blank: None
) -> None:
    session = bed.session()
    browser.open(session["viewUrl"])
    playing = browser.wait_playing(1.0)[1]

    camera = bed.camera
    camera.stop()
    browser.wait(lambda s: s["state"] != "live" or "unavailable" in s["shownState"], 30)
    bed.cloud.cameras["plain"] = RtspCamera(bed.cloud.folder / "camera", port=camera.port)
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
    session = bed.session()
    browser.open(session["viewUrl"])
    browser.wait_playing(1.0)
    records = bed.cloud.records
    left_before = len(records.events("view.viewer_left"))

    silent = SilentViewer(
        "127.0.0.1",
        bed.relay.port,
        f"/v1/sessions/{session['id']}/live",
        session["token"],
        bed.tls(),
    )
    try:
        browser.wait(lambda s: s["shownViewers"] == "2")
        first, last = browser.wait_playing(4.0)
        deadline = time.monotonic() + 60
        while not [
            line
            for line in records.events("view.viewer_left")[left_before:]
            if "too slow" in line or "socket stalled" in line
        ]:
            assert time.monotonic() < deadline, records.events("view.viewer_left")
            time.sleep(0.2)
        after = browser.wait_playing(2.0)[1]
    finally:
        silent.close()

    assert last["currentTime"] - first["currentTime"] >= 4.0
    assert after["width"] == CAMERA_SIZE[0] and after["state"] == "live"
    assert records.events("view.viewer_behind") or records.events("view.viewer_left")


async def test_snapshot_answers_a_jpeg_of_the_camera_size(bed: Bed) -> None:
    session = bed.session()
    url = f"{bed.base}/v1/sessions/{session['id']}/snapshot.jpg"
    async with aiohttp.ClientSession() as client:
        async with client.get(url, ssl=bed.tls()) as response:
            assert response.status == 401
        bad = {"Authorization": "Bearer not-the-token"}
        async with client.get(url, headers=bad, ssl=bed.tls()) as response:
            assert response.status == 401
        good = {"Authorization": f"Bearer {session['token']}"}
        async with client.get(url, headers=good, ssl=bed.tls()) as response:
            assert response.status == 200
            assert response.content_type == "image/jpeg"
            jpeg = await response.read()

    assert _jpeg_size(bed, session["id"], jpeg) == CAMERA_SIZE


async def test_camera_credentials_reach_the_camera_and_no_log_or_answer(bed: Bed) -> None:
    status, refused = await call_api(
        bed.cloud,
        bed.relay,
        "POST",
        "/v1/sessions",
        body={"deviceId": AGENT_DEVICE, "localPort": 554, "rtspPassword": "x" * 20},
    )
    assert status == 400 and "rtspPassword needs rtspUsername" in refused["error"]
    status, refused = await call_api(
        bed.cloud,
        bed.relay,
        "POST",
        "/v1/sessions",
        body={"deviceId": AGENT_DEVICE, "localPort": 554, "rtspPath": "no-slash"},
    )
    assert status == 400 and "rtspPath" in refused["error"]
    session = bed.session("digest", rtspUsername="viewer", rtspPassword=CAMERA_PASSWORD)
    url = f"{bed.base}/v1/sessions/{session['id']}/snapshot.jpg"
    headers = {"Authorization": f"Bearer {session['token']}"}
    async with (
        aiohttp.ClientSession() as client,
        client.get(url, headers=headers, ssl=bed.tls()) as response,
    ):
        assert response.status == 200, await response.text()
        jpeg = await response.read()
    status, listing = await call_api(bed.cloud, bed.relay, "GET", "/v1/sessions")

    assert _jpeg_size(bed, session["id"], jpeg) == CAMERA_SIZE
    assert CAMERA_PASSWORD not in json.dumps([session, listing])
    assert not any(CAMERA_PASSWORD in line for line in bed.cloud.records.lines)
    listed = next(s for s in listing["sessions"] if s["id"] == session["id"])
    assert listed["viewUrl"] == f"{bed.base}/v1/sessions/{session['id']}/view"  # no token
    assert listed["rtspPath"] == "/test"


def _jpeg_size(bed: Bed, name: str, jpeg: bytes) -> tuple[int, int]:
    path = Path(bed.cloud.folder) / f"snapshot-{name}.jpg"
    path.write_bytes(jpeg)
    return _image_size(path)


def _image_size(path: Path) -> tuple[int, int]:
    """Width and height of the image PyAV decodes from ``path``, read by the JPEG decoder."""
    with av.open(str(path), format="mjpeg") as image:
        frame = next(image.decode(video=0))
    return frame.width, frame.height


def test_the_snapshot_button_downloads_a_jpeg_of_the_camera_size(
    bed: Bed, browser: Browser, blank: None, tmp_path: Path
) -> None:
    session = bed.session()
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser.driver.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
    )
    try:
        browser.open(session["viewUrl"])
        browser.wait_playing(1.0)
        browser.wait_for("return !document.getElementById('snapshot').disabled")
        browser.run("document.getElementById('snapshot').click()")

        deadline = time.monotonic() + 20.0
        while not (
            (files := sorted(downloads.iterdir())) and all(f.suffix == ".jpg" for f in files)
        ):
            assert time.monotonic() < deadline, f"no complete download; folder holds {files}"
            time.sleep(0.1)
    finally:
        browser.driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "default"})

    assert len(files) == 1, files
    (jpeg,) = files
    assert jpeg.name.startswith(f"snapshot-{session['id']}-")
    assert jpeg.read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG start-of-image marker
    assert _image_size(jpeg) == CAMERA_SIZE


def test_h265_the_browser_cannot_play_is_explained(bed: Bed, browser: Browser, blank: None) -> None:
    supported = browser.run(
        "return MediaSource.isTypeSupported('video/mp4; codecs=\"hvc1.1.6.L63.90\"')"
    )
    session = bed.session("hevc")

    browser.open(session["viewUrl"])
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


async def test_a_revoked_session_closes_its_viewers_watch(bed: Bed) -> None:
    session = bed.session()
    session_id = session["id"]
    url = f"wss://127.0.0.1:{bed.relay.port}/v1/sessions/{session_id}/live"
    watches = bed.view.service.watches
    async with aiohttp.ClientSession() as client, client.ws_connect(url, ssl=bed.tls()) as ws:
        await ws.send_str(json.dumps({"type": "auth", "token": session["token"]}))
        first = json.loads((await ws.receive(timeout=10)).data)
        assert first["type"] == "status"
        await until(lambda: session_id in watches, timeout_s=10)
        status, _ = await call_api(bed.cloud, bed.relay, "DELETE", f"/v1/sessions/{session_id}")
        assert status == 204
        while (message := await ws.receive(timeout=10)).type == aiohttp.WSMsgType.BINARY or (
            message.type == aiohttp.WSMsgType.TEXT and '"error"' not in message.data
        ):
            pass
        assert message.type == aiohttp.WSMsgType.TEXT
        assert json.loads(message.data)["code"] == "revoked"
    await until(lambda: session_id not in watches, timeout_s=10)


async def test_video_leaves_uncompressed_for_a_viewer_offering_deflate(bed: Bed) -> None:
    """Browsers offer permessage-deflate; deflating video costs CPU and saves nothing."""
    session = bed.session()
    url = f"wss://127.0.0.1:{bed.relay.port}/v1/sessions/{session['id']}/live"
    async with (
        aiohttp.ClientSession() as client,
        client.ws_connect(url, ssl=bed.tls(), compress=15) as ws,
    ):
        assert ws.compress == 0  # the offer was declined
        await ws.send_str(json.dumps({"type": "auth", "token": session["token"]}))
        while (message := await ws.receive(timeout=20)).type != aiohttp.WSMsgType.BINARY:
            assert message.type == aiohttp.WSMsgType.TEXT
        assert message.data[4:8] == b"ftyp"  # the init segment, as written


def test_the_index_page_lists_sessions_and_makes_one_that_plays(
    bed: Bed, browser: Browser, blank: None
) -> None:
    session = bed.session()

    browser.open(bed.base + "/")
    browser.driver.find_element("id", "api-key").send_keys(API_KEY)
    browser.driver.find_element("css selector", "#key-form button[type=submit]").click()
    row = "#sessions tr[data-session-id='{}']".format(session["id"])
    deadline = time.monotonic() + 20
    while not browser.driver.find_elements("css selector", row):
        assert time.monotonic() < deadline, browser.driver.find_element("id", "error").text
        time.sleep(0.1)
    cells = [c.text for c in browser.driver.find_elements("css selector", row + " td")]
    stored = browser.run("return Object.values(sessionStorage)")

    assert cells[:3] == [session["id"], AGENT_DEVICE, str(bed.cloud.camera_port())]
    assert API_KEY in stored and API_KEY not in browser.driver.current_url

    find = browser.driver.find_element
    find("id", "device-id").send_keys(AGENT_DEVICE)
    find("id", "local-port").clear()
    find("id", "local-port").send_keys(str(bed.cloud.camera_port()))
    find("id", "ttl").send_keys("600")
    find("id", "rtsp-path").send_keys("/test")
    find("css selector", "#create-form button[type=submit]").click()
    _, last = browser.wait_playing(2.0)  # the new session's view opened and plays

    assert (last["width"], last["height"]) == CAMERA_SIZE
    made = browser.driver.current_url.split("/")[-2]
    assert made != session["id"] and made in bed.relay.relay.sessions.sessions


def test_demo_keep_running_prints_a_view_link_that_plays(
    browser: Browser, blank: None, tmp_path: Path
) -> None:
    demo = subprocess.Popen(
        dying_with_parent(
            [
                sys.executable,
                "-m",
                "tunnel_agent",
                "demo",
                "--seconds",
                "2",
                "--keep-running",
                "--output",
                str(tmp_path),
            ],
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its camera and agent share its group, to be ended with it
    )
    try:
        assert demo.stdout is not None
        seen: list[str] = []
        deadline = time.monotonic() + 120
        link = None
        while link is None:
            assert time.monotonic() < deadline and demo.poll() is None, "".join(seen)
            line = demo.stdout.readline()
            seen.append(line)
            if "watch in a browser" in line:
                link = line.split()[-1]

        assert re.fullmatch(r"https://127\.0\.0\.1:\d+/v1/sessions/\w+/view#token=\S+", link)
        browser.open(link)
        _, last = browser.wait_playing(2.0)
        assert (last["width"], last["height"]) == CAMERA_SIZE
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            demo.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait(10)
        left = group_members(demo.pid)
        if left:
            os.killpg(demo.pid, signal.SIGKILL)
    assert demo.returncode == 0
    assert not left, f"the demo left {len(left)} process(es) running"
