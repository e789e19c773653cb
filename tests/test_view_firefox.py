"""The relay's pages in real headless Firefox ESR (Debian's ``firefox-esr``), over WebDriver BiDi.

The same path as tests/test_view.py proves in Chromium: devhub -> agent -> gst-rtsp-server camera,
the relay's session API calling ``tunnelOpen``, PyAV remuxing to fragmented MP4, and here
Firefox's MSE (H.264 decoded through the system's libavcodec). One browser and one bed serve the
whole module; each test reopens the page.
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

    def session(self) -> dict[str, Any]:
        return self.cloud.servers.run(create_session(self.cloud, self.relay, rtspPath="/test"))


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory, servers: ThreadLoop) -> Iterator[Bed]:
    folder = tmp_path_factory.mktemp("view-firefox")
    camera = RtspCamera(folder / "camera")
    cloud = start_bed(folder, servers, {"plain": camera})
    yield Bed(cloud, cloud.start_relay())
    cloud.close()
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
    codec = page.run(
        "return MediaSource.isTypeSupported(arguments[0])", 'video/mp4; codecs="avc1.64001f"'
    )

    page.open(session["viewUrl"])
    first, last = page.wait_playing(3.0)

    assert codec is True
    assert (last["width"], last["height"]) == CAMERA_SIZE
    assert last["currentTime"] - first["currentTime"] >= 3.0
    shown = page.wait(lambda s: s["shownViewers"] == "1" and "kbit/s" in s["shownBitrate"])
    assert shown["shownResolution"] == "640 x 360" and shown["shownState"] == "live"
    assert "#token" not in page.url
    screenshot = page.screenshot(tmp_path / "playing-firefox.png")
    print(f"screenshot of the playing page in Firefox {page.version}: {screenshot}")


def test_firefox_shows_a_refused_token_and_no_tunnel_opens(bed: Bed, page: Firefox) -> None:
    session = bed.session()
    before = bed.cloud.device_calls()

    page.open(session["viewUrl"].replace(session["token"], session["token"][:-4] + "AAAA"))
    refused = page.wait(lambda s: s["error"] == "refused")

    assert "not valid" in refused["shownMessage"] and refused["width"] == 0
    assert bed.cloud.records.events("view.viewer_refused")
    assert bed.cloud.device_calls() == before


def test_firefox_index_page_lists_a_session_made_through_the_api(bed: Bed, page: Firefox) -> None:
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
