"""Headless Chromium (Debian's ``chromium`` + ``chromium-driver``) driven with selenium.

``PageChecks`` reads a page's state the same way in any browser (Firefox: tests/support/bidi.py).
One ``Browser`` is one browser process with a fresh profile: two viewers are two browsers, since
background tabs throttle video. Nothing is downloaded; the flags keep Chromium off the network.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--autoplay-policy=no-user-gesture-required",
    "--mute-audio",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--disable-dev-shm-usage",
    "--window-size=1280,1000",
)

# What the page's video shows, read in one round trip.
VIDEO_STATE = """
const v = document.getElementById('video');
const t = window.tunnelView || {};
return {currentTime: v ? v.currentTime : 0, width: v ? v.videoWidth : 0,
        height: v ? v.videoHeight : 0, state: t.state, error: t.error, message: t.message,
        viewers: t.viewers, framesShown: t.framesShown, firstFrameMs: t.firstFrameMs,
        connects: t.connects, generation: t.stream ? t.stream.generation : null,
        shownState: (document.getElementById('state') || {}).textContent,
        shownResolution: (document.getElementById('resolution') || {}).textContent,
        shownBitrate: (document.getElementById('bitrate') || {}).textContent,
        shownViewers: (document.getElementById('viewers') || {}).textContent,
        shownMessage: (document.getElementById('message') || {}).textContent};
"""


def available() -> bool:
    return Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()


class PageChecks:
    """What the view tests read from a page, for any browser that can ``run`` a script body."""

    def run(self, script: str, *args: Any) -> Any:
        raise NotImplementedError

    def video(self) -> dict[str, Any]:
        state: dict[str, Any] = self.run(VIDEO_STATE)
        return state

    def wait(
        self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = 20.0
    ) -> dict[str, Any]:
        """Poll the page's video state until ``predicate`` holds; fail with the last state."""
        deadline = time.monotonic() + timeout_s
        while True:
            state = self.video()
            if predicate(state):
                return state
            if time.monotonic() > deadline:
                raise AssertionError(f"page never got there; last state: {state}")
            time.sleep(0.1)

    def wait_for(self, script: str, *args: Any, timeout_s: float = 20.0) -> Any:
        """Poll ``script`` until it returns something truthy; that."""
        deadline = time.monotonic() + timeout_s
        while not (value := self.run(script, *args)):
            assert time.monotonic() < deadline, f"{script!r} never held"
            time.sleep(0.1)
        return value

    def wait_playing(self, seconds: float, timeout_s: float = 30.0) -> tuple[dict[str, Any], ...]:
        """Wait until the video plays, then until it has advanced ``seconds`` more."""
        first = self.wait(lambda s: s["currentTime"] > 0 and s["width"] > 0, timeout_s)
        start = first["currentTime"]
        last = self.wait(lambda s: s["currentTime"] >= start + seconds, seconds * 3 + 10)
        return first, last


class Browser(PageChecks):
    def __init__(self, *, ignore_certificate_errors: bool = False) -> None:
        self.profile = Path(tempfile.mkdtemp(prefix="ta-chromium-"))
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={self.profile}")
        if ignore_certificate_errors:
            options.add_argument("--ignore-certificate-errors")
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        self.driver.set_page_load_timeout(30)
        self.driver.set_script_timeout(30)

    def open(self, url: str) -> None:
        self.driver.get(url)

    def run(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(path))
        return path

    def close(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)
