"""The relay's pages in real headless Firefox ESR (Debian's ``firefox-esr``), over WebDriver BiDi.

The same path as tests/test_view.py proves in Chromium: devhub -> agent -> gst-rtsp-server camera,
the relay's session API calling ``tunnelOpen``, PyAV remuxing to fragmented MP4, and here
Firefox's MSE (H.264, and H.265 where Firefox says it can, decoded through the system's
libavcodec). One browser and one bed serve the whole module; each test reopens the page.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.bidi import Firefox, available
from tests.support.camera import RtspCamera
from tests.support.relay_bed import AGENT_DEVICE, API_KEY, RelayBed, create_session, start_bed
from tests.support.threadloop import ThreadLoop
from tunnel_agent.cloud.relay.runner import RunningRelay

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not available(), reason="needs Debian's firefox-esr"),
]
CAMERA_SIZE = (640, 360)


@dataclass
class Bed:
    cloud: RelayBed
    relay: RunningRelay

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.relay.port}"

    def session(self, camera: str = "plain") -> dict[str, Any]:
        port = self.cloud.camera_port(camera)
        made = create_session(self.cloud, self.relay, localPort=port, rtspPath="/test")
        return self.cloud.servers.run(made)


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory, servers: ThreadLoop) -> Iterator[Bed]:
    folder = tmp_path_factory.mktemp("view-firefox")
    cameras = {
        "plain": RtspCamera(folder / "camera"),
        "hevc": RtspCamera(folder / "camera-h265", extra=["--codec", "h265"]),
    }
    cloud = start_bed(folder, servers, cameras)
    yield Bed(cloud, cloud.start_relay())
    cloud.close()
    for camera in cameras.values():
        camera.stop()


@pytest.fixture(scope="module")
def firefox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Firefox]:
    browser = Firefox(tmp_path_factory.mktemp("firefox"))
    yield browser
    browser.close()


@pytest.fixture
def page(firefox: Firefox) -> Iterator[Firefox]:
    """The browser, left on a blank page after the test so that no viewer outlives it."""
    seen = len(firefox.errors())
    yield firefox
    firefox.open("about:blank")
    assert firefox.errors()[seen:] == []  # no CSP violation, no script error


def test_firefox_plays_the_camera(bed: Bed, page: Firefox, tmp_path: Path) -> None:
    session = bed.session()

    page.open(session["viewUrl"])
    stream = _stream_offered(page)
    assert stream["codecs"][0].startswith("avc1")
    assert _can_play(page, stream), "no H.264 in this Firefox: it needs the system's libavcodec"
    _assert_plays(page, tmp_path / "playing-firefox.png")

    shown = page.wait(lambda s: s["shownViewers"] == "1" and "kbit/s" in s["shownBitrate"])
    assert shown["shownResolution"] == "640 x 360" and shown["shownState"] == "live"
    assert "#token" not in page.url


def test_firefox_shows_a_refused_token_and_no_tunnel_opens(bed: Bed, page: Firefox) -> None:
    session = bed.session()
    before = bed.cloud.device_calls()

    page.open(session["viewUrl"].replace(session["token"], session["token"][:-4] + "AAAA"))
    refused = page.wait(lambda s: s["error"] == "refused")

    assert "not valid" in refused["shownMessage"] and refused["width"] == 0
    assert bed.cloud.records.events("view.viewer_refused")
    assert bed.cloud.device_calls() == before


def test_firefox_index_page_lists_sessions_and_makes_one_that_plays(
    bed: Bed, page: Firefox
) -> None:
    session = bed.session()

    page.open(bed.base + "/")
    page.type("#api-key", API_KEY)
    page.click("#key-form button[type=submit]")
    row = "#sessions tr[data-session-id='{}']".format(session["id"])
    cells = page.wait_for(
        "return Array.from(document.querySelectorAll(arguments[0] + ' td'), td => td.textContent)",
        row,
    )

    assert cells[:3] == [session["id"], AGENT_DEVICE, str(bed.cloud.camera_port())]
    assert API_KEY in page.run("return Object.values(sessionStorage)")
    assert API_KEY not in page.url

    page.type("#device-id", AGENT_DEVICE)
    page.run("document.getElementById('local-port').value = ''")  # as a person clears it
    page.type("#local-port", str(bed.cloud.camera_port()))
    page.type("#ttl", "600")
    page.type("#rtsp-path", "/test")
    view = page.navigates(lambda: page.click("#create-form button[type=submit]"), to="/view")
    _, last = page.wait_playing(2.0)  # the new session's view opened and plays

    assert (last["width"], last["height"]) == CAMERA_SIZE
    made = view.split("/")[-2]
    assert made != session["id"] and made in bed.relay.relay.sessions.sessions


def test_firefox_plays_h265_where_it_says_it_can(bed: Bed, page: Firefox, tmp_path: Path) -> None:
    session = bed.session("hevc")

    page.open(session["viewUrl"])
    stream = _stream_offered(page)

    assert stream["codecs"][0].startswith(("hvc1", "hev1"))
    if _can_play(page, stream):
        _assert_plays(page, tmp_path / "playing-firefox-h265.png")
    else:
        refused = page.wait(lambda s: s["error"] == "unsupported")
        assert "H.265" in refused["shownMessage"] and "cannot play" in refused["shownMessage"]


def _stream_offered(page: Firefox) -> dict[str, Any]:
    """The stream the relay offered the page (codec strings, MIME type)."""
    stream: dict[str, Any] = page.wait_for(
        "return window.tunnelView && window.tunnelView.stream", timeout_s=30
    )
    return stream


def _can_play(page: Firefox, stream: dict[str, Any]) -> bool:
    supported = page.run("return MediaSource.isTypeSupported(arguments[0])", stream["mimeType"])
    print(
        f"Firefox {page.version}: MediaSource.isTypeSupported({stream['mimeType']}) = {supported}"
    )
    return supported is True


def _assert_plays(page: Firefox, screenshot: Path) -> None:
    """The page plays the camera: 3 s of playback, frames decoded and shown, the camera's size."""
    first, last = page.wait_playing(3.0)
    assert (last["width"], last["height"]) == CAMERA_SIZE
    assert last["currentTime"] - first["currentTime"] >= 3.0
    assert last["framesShown"] - first["framesShown"] >= 15  # the camera sends 15 per second
    print(f"screenshot of the playing page: {page.screenshot(screenshot)}")
