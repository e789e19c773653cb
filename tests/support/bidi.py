"""Headless Firefox ESR (Debian's ``firefox-esr``) driven over WebDriver BiDi.

Debian has no geckodriver, and none is needed: Firefox itself serves BiDi at
``ws://127.0.0.1:PORT/session`` when started with ``--remote-debugging-port``. This client knows
the few commands the page tests use (navigate, run a script, type, click, screenshot) and no
more. Every wait has a deadline; the browser is always killed and its profile removed.

``Firefox`` has the same synchronous face as the Chromium ``Browser`` (``open``, ``run`` with a
script body that may ``return``, ``screenshot``, ``close``), so the page checks in
``tests/support/browser.py`` serve both. Its WebSocket lives on a loop of its own in a thread.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.browser import PageChecks
from tests.support.processes import ManagedProcess
from tests.support.threadloop import ThreadLoop

FIREFOX = "/usr/bin/firefox-esr"
COMMAND_TIMEOUT_S = 30.0
START_TIMEOUT_S = 30.0

# user.js of the fresh profile: BiDi only, video that starts by itself, and nothing that phones
# home (the remote agent's own recommended prefs cover most of the rest).
PREFS: dict[str, bool | int | str] = {
    "remote.active-protocols": 1,
    "media.autoplay.default": 0,
    "media.autoplay.blocking_policy": 0,
    "media.volume_scale": "0.0",
    "app.update.disabledForTesting": True,
    "app.update.auto": False,
    "app.update.url": "",
    "app.update.url.override": "",
    "app.update.checkInstallTime": False,
    "media.gmp-manager.updateEnabled": False,
    "media.gmp-manager.url": "data:,",
    "browser.shell.checkDefaultBrowser": False,
    "browser.startup.homepage_override.mstone": "ignore",
    "datareporting.policy.dataSubmissionEnabled": False,
    "toolkit.telemetry.reportingpolicy.firstRun": False,
    "services.settings.server": "data:,",
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
    "extensions.getAddons.cache.enabled": False,
    "browser.safebrowsing.update.enabled": False,
    # Anything else goes to a SOCKS proxy that is not there, and so do its DNS look-ups; loopback
    # (the relay) is never proxied.
    "network.proxy.type": 1,
    "network.proxy.socks": "127.0.0.1",
    "network.proxy.socks_port": 9,
    "network.proxy.socks_remote_dns": True,
    "network.trr.mode": 5,
    "network.dns.disablePrefetch": True,
    "network.prefetch-next": False,
}
LISTENING = re.compile(r"WebDriver BiDi listening on (ws://\S+)")


def available() -> bool:
    return Path(FIREFOX).exists()


class BidiError(AssertionError):
    """A command the browser answered with an error (its ``error`` code and ``message``)."""


def from_remote(value: dict[str, Any]) -> Any:
    """A BiDi RemoteValue as plain Python: primitives, lists, dicts; nodes stay as they are
    (their ``sharedId`` is what input actions point at)."""
    kind = value["type"]
    if kind in ("undefined", "null"):
        return None
    if kind in ("string", "boolean"):
        return value["value"]
    if kind == "number":
        number = value["value"]
        return float("nan") if number == "NaN" else number
    if kind in ("array", "set"):
        return [from_remote(item) for item in value.get("value", [])]
    if kind in ("object", "map"):
        return {
            key if isinstance(key, str) else from_remote(key): from_remote(item)
            for key, item in value.get("value", [])
        }
    return value


def to_local(value: Any) -> dict[str, Any]:
    """A Python argument as a BiDi LocalValue (the few kinds the tests pass)."""
    if value is None:
        return {"type": "null"}
    if isinstance(value, bool):
        return {"type": "boolean", "value": value}
    if isinstance(value, int | float):
        return {"type": "number", "value": value}
    if isinstance(value, str):
        return {"type": "string", "value": value}
    raise TypeError(f"no BiDi value for {type(value).__name__}")


class BidiConnection:
    """One WebSocket to the browser: commands matched to answers by id; log entries kept."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.log: list[dict[str, Any]] = []
        self.loaded: list[str] = []  # URLs of pages whose load event fired, in order
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(message.data)
            if data.get("type") == "event":
                if data["method"] == "log.entryAdded":
                    self.log.append(data["params"])
                elif data["method"] == "browsingContext.load":
                    self.loaded.append(data["params"]["url"])
                continue
            future = self.waiting.pop(data.get("id", -1), None)
            if future is not None and not future.done():
                future.set_result(data)
        for future in self.waiting.values():
            if not future.done():
                future.set_exception(BidiError("the browser closed its BiDi connection"))

    async def command(
        self, method: str, params: dict[str, Any], timeout_s: float = COMMAND_TIMEOUT_S
    ) -> dict[str, Any]:
        command_id = next(self.ids)
        future = asyncio.get_running_loop().create_future()
        self.waiting[command_id] = future
        await self.ws.send_str(json.dumps({"id": command_id, "method": method, "params": params}))
        try:
            answer = await asyncio.wait_for(future, timeout_s)
        finally:
            self.waiting.pop(command_id, None)
        if answer.get("type") == "error":
            raise BidiError(f"{method}: {answer.get('error')}: {answer.get('message')}")
        result: dict[str, Any] = answer["result"]
        return result

    async def close(self) -> None:
        await self.ws.close()
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)


class Firefox(PageChecks):
    """One headless Firefox process with a fresh profile and one tab, driven over BiDi."""

    def __init__(self, folder: Path) -> None:
        """``folder`` keeps the browser's log; the profile made in it is removed at the end."""
        folder.mkdir(parents=True, exist_ok=True)
        self.profile = Path(tempfile.mkdtemp(prefix="profile-", dir=folder))
        self.log_file = self.profile.with_name(self.profile.name + ".log")
        self.loop = ThreadLoop("firefox-bidi")
        self.http: aiohttp.ClientSession | None = None
        self.bidi: BidiConnection | None = None
        self.process: ManagedProcess | None = None
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        (self.profile / "user.js").write_text(
            "".join(f"user_pref({json.dumps(k)}, {json.dumps(v)});\n" for k, v in PREFS.items())
        )
        self.process = ManagedProcess(
            [
                FIREFOX,
                "--headless",
                "--no-remote",
                "--remote-debugging-port=0",
                "--profile",
                str(self.profile),
            ],
            self.log_file,
            env={
                "MOZ_CRASHREPORTER_DISABLE": "1",
                "MOZ_DISABLE_AUTO_SAFE_MODE": "1",
                # Lets services.settings.server above take effect in a release build.
                "MOZ_REMOTE_SETTINGS_DEVTOOLS": "1",
            },
        )
        out = self.process.wait_for(
            lambda text: LISTENING.search(text) is not None, START_TIMEOUT_S
        )
        match = LISTENING.search(out)
        assert match is not None
        self.context = self.loop.run(self._connect(match.group(1) + "/session"))

    async def _connect(self, url: str) -> str:
        self.http = aiohttp.ClientSession()
        ws = await self.http.ws_connect(url, max_msg_size=0, timeout=aiohttp.ClientWSTimeout(10))
        self.bidi = BidiConnection(ws)
        capabilities = {"alwaysMatch": {"acceptInsecureCerts": True}}
        session = await self.bidi.command("session.new", {"capabilities": capabilities})
        self.version: str = session["capabilities"]["browserVersion"]
        await self.bidi.command(
            "session.subscribe", {"events": ["log.entryAdded", "browsingContext.load"]}
        )
        tree = await self.bidi.command("browsingContext.getTree", {"maxDepth": 0})
        context: str = tree["contexts"][0]["context"]
        viewport = {"width": 1280, "height": 1000}  # as the Chromium tests' window
        await self.bidi.command(
            "browsingContext.setViewport", {"context": context, "viewport": viewport}
        )
        return context

    def command(
        self, method: str, params: dict[str, Any], timeout_s: float = COMMAND_TIMEOUT_S
    ) -> dict[str, Any]:
        assert self.bidi is not None
        return self.loop.run(self.bidi.command(method, params, timeout_s), timeout_s + 5)

    def open(self, url: str) -> None:
        self.command(
            "browsingContext.navigate", {"context": self.context, "url": url, "wait": "complete"}
        )

    def _call(self, script: str, args: tuple[Any, ...], ownership: str) -> dict[str, Any]:
        answer = self.command(
            "script.callFunction",
            {
                "functionDeclaration": f"function() {{\n{script}\n}}",
                "arguments": [to_local(arg) for arg in args],
                "target": {"context": self.context},
                "awaitPromise": True,
                "resultOwnership": ownership,
            },
        )
        if answer["type"] == "exception":
            details = answer["exceptionDetails"]
            raise BidiError(f"script failed: {details.get('text')}")
        result: dict[str, Any] = answer["result"]
        return result

    def run(self, script: str, *args: Any) -> Any:
        """``script`` is a function body (``arguments[i]`` are ``args``), as with selenium."""
        return from_remote(self._call(script, args, "none"))

    @property
    def url(self) -> str:
        url: str = self.run("return location.href")
        return url

    def _element(self, selector: str) -> dict[str, Any]:
        node = self._call("return document.querySelector(arguments[0])", (selector,), "root")
        assert node["type"] == "node", f"no element {selector!r} on {self.url}"
        return {"type": "element", "element": {"sharedId": node["sharedId"]}}

    def click(self, selector: str) -> None:
        """A real mouse click in the middle of the element, as a person clicks."""
        pointer = {
            "type": "pointer",
            "id": "mouse",
            "parameters": {"pointerType": "mouse"},
            "actions": [
                {"type": "pointerMove", "x": 0, "y": 0, "origin": self._element(selector)},
                {"type": "pointerDown", "button": 0},
                {"type": "pointerUp", "button": 0},
            ],
        }
        self.command("input.performActions", {"context": self.context, "actions": [pointer]})

    def type(self, selector: str, text: str) -> None:
        """Click into the element, then type ``text`` key by key."""
        self.click(selector)
        keys = [{"type": kind, "value": char} for char in text for kind in ("keyDown", "keyUp")]
        keyboard = {"type": "key", "id": "keyboard", "actions": keys}
        self.command("input.performActions", {"context": self.context, "actions": [keyboard]})

    def navigates(self, action: Callable[[], None], to: str, timeout_s: float = 20.0) -> str:
        """Do ``action`` (a click that leaves the page), then wait until a page whose URL contains
        ``to`` has loaded, so that no script runs in the page being left; that URL."""
        assert self.bidi is not None
        seen = len(self.bidi.loaded)
        action()
        deadline = time.monotonic() + timeout_s
        while not (urls := [url for url in self.bidi.loaded[seen:] if to in url]):
            assert time.monotonic() < deadline, f"no page {to!r} loaded: {self.bidi.loaded[seen:]}"
            time.sleep(0.05)
        return urls[0]

    def errors(self) -> list[str]:
        """Console errors and uncaught exceptions so far (CSP violations among them)."""
        assert self.bidi is not None
        return [str(e.get("text")) for e in self.bidi.log if e.get("level") == "error"]

    def screenshot(self, path: Path) -> Path:
        shot = self.command("browsingContext.captureScreenshot", {"context": self.context})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def close(self) -> None:
        try:
            if self.bidi is not None:
                # Killed below all the same if it does not close by itself.
                with contextlib.suppress(BidiError, TimeoutError, aiohttp.ClientError):
                    self.command("browser.close", {}, timeout_s=5)
                self.loop.run(self.bidi.close(), 10)
            if self.http is not None:
                self.loop.run(self.http.close(), 10)
        finally:
            if self.process is not None:
                self.process.stop(timeout_s=10)
                # Helpers of its own that outlived it (same process group).
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
            self.loop.close()
            shutil.rmtree(self.profile, ignore_errors=True)
