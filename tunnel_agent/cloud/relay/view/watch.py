"""One watched session: one tunnel, one remuxer, any number of viewers (up to the limit).

The first viewer starts it: the watch asks for a way to the camera (``OpenCamera``: the relay
opens a tunnel whose near end is joined to the RTSP client in memory), the remuxer reads the
camera through it on this event loop (``remux``), and every fragment goes into each viewer's
bounded queue, from which that viewer's own sender writes to its WebSocket. The camera connection
is restarted with backoff when it ends (a camera restart, a dropped tunnel, an offline device),
each time as a new *generation* with its own init segment. When the last viewer leaves, the
tunnel stays up ``grace_s`` in case someone comes back. Once a second the watch asks whether its
session still exists; when it has ended, viewers are told why and the watch closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from tunnel_agent.cloud.relay.view.fanout import GopCache, Offer, ViewerQueue
from tunnel_agent.cloud.relay.view.segments import (
    CameraStreamError,
    Fragment,
    InitSegment,
    Keyframe,
)
from tunnel_agent.logs import EventLogger, redact_text
from tunnel_agent.media.backoff import Backoff
from tunnel_agent.rtsp.errors import RtspConnectionLost, RtspError

BITRATE_WINDOW_S = 2.0
STATUS_EVERY_S = 1.0


@dataclass(frozen=True)
class ViewLimits:
    """Tunables of the view (the relay's settings fill them in)."""

    max_viewers: int = 16
    grace_s: float = 10.0
    queue_bytes: int = 4 * 1024 * 1024  # per viewer: several seconds of a typical camera
    socket_send_buffer_bytes: int = 256 * 1024
    gop_cache_bytes: int = 16 * 1024 * 1024
    send_stall_s: float = 10.0  # a viewer whose socket takes no bytes this long is closed
    open_timeout_s: float = 10.0
    read_timeout_s: float = 10.0
    retry_initial_s: float = 1.0
    retry_max_s: float = 15.0
    snapshot_wait_s: float = 10.0


@dataclass(frozen=True)
class WatchTarget:
    """What to watch: the session's device and camera port, and where the stream is on it."""

    session_id: str
    device_id: str
    local_port: int
    rtsp_path: str = "/"
    username: str | None = None
    password: str | None = field(default=None, repr=False)


class TunnelUnavailable(Exception):
    """No way to the camera could be opened; the message is for viewers (no secrets, no ids)."""


class CameraLink(Protocol):
    """One way to the camera, for one remuxer run: how to connect, and what went wrong."""

    def connect(self, protocol: asyncio.Protocol) -> None:
        """Join ``protocol`` to a new tunnel to the camera; ``TunnelUnavailable`` if none can be
        opened now."""

    def failure(self) -> str | None:
        """Why the tunnel behind the port failed (device offline, refused...), if it did."""

    def close(self) -> None:
        """Close the tunnel: a read the remuxer waits in ends at once."""


OpenCamera = Callable[[], Awaitable[CameraLink]]


@dataclass(frozen=True)
class Ending:
    """Why viewers must go, as the page shows it: a short code and a sentence."""

    code: str
    message: str
    close_code: int


SessionEnded = Callable[[], Ending | None]


class Viewer:
    """One WebSocket viewer: its queue and the event that wakes its sender."""

    def __init__(self, viewer_id: str, limits: ViewLimits) -> None:
        self.id = viewer_id
        self.queue = ViewerQueue(limits.queue_bytes)
        self.wake = asyncio.Event()
        self.closing: str | None = None  # why the watch wants this viewer gone
        self.ending: Ending | None = None  # set when the session itself has ended
        self.bytes_sent = 0

    def push_status(self, status: dict[str, Any]) -> None:
        self.queue.set_status(json.dumps(status))
        self.wake.set()

    def tell_to_go(self, reason: str, ending: Ending | None = None) -> None:
        self.closing = reason
        self.ending = ending
        self.wake.set()


class Watch:
    def __init__(
        self,
        target: WatchTarget,
        open_camera: OpenCamera,
        session_ended: SessionEnded,
        limits: ViewLimits,
        on_closed: Callable[[Watch], None],
    ) -> None:
        self.target = target
        self.limits = limits
        self.log = EventLogger("tunnel_agent.relay.view", session=target.session_id)
        self._open_camera = open_camera
        self._session_ended = session_ended
        self._link: CameraLink | None = None
        self.links_opened = 0
        self.cache = GopCache(limits.gop_cache_bytes)
        self.viewers: dict[str, Viewer] = {}
        self.state = "starting"
        self.reason: str | None = None
        self.init: InitSegment | None = None
        self.keyframe: Keyframe | None = None
        self.generation = 0
        self.keyframe_arrived = asyncio.Event()
        self.tunnels_opened = 0
        self._on_closed = on_closed
        self._task: asyncio.Task[None] | None = None
        self._status_task: asyncio.Task[None] | None = None
        self._grace: asyncio.TimerHandle | None = None
        self._holds = 0  # snapshot requests keeping the watch up without a viewer
        self._recent: deque[tuple[float, int]] = deque()
        self._snapshot: tuple[int, int, bytes, int, int] | None = None  # gen, seq, jpeg, w, h
        self.closed = False
        self._closing: asyncio.Task[None] | None = None

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())
        self._status_task = asyncio.get_running_loop().create_task(self._report())
        self.log.info("view.watch_started", device=self.target.device_id)

    async def close(self, reason: str, ending: Ending | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        if self._grace is not None:
            self._grace.cancel()
        for viewer in self.viewers.values():
            viewer.tell_to_go(reason, ending)
        if self._link is not None:
            self._link.close()
        for task in (self._task, self._status_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self.log.info("view.watch_closed", reason=reason, tunnels=self.links_opened)
        self._on_closed(self)

    def close_soon(self, reason: str, ending: Ending | None = None) -> None:
        """Close from a callback (a timer); the task is kept so it cannot be collected early."""
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self.close(reason, ending))

    def _idle(self) -> bool:
        return not self.viewers and self._holds == 0

    def _maybe_start_grace(self) -> None:
        if self._idle() and self._grace is None and not self.closed:
            loop = asyncio.get_running_loop()
            self._grace = loop.call_later(self.limits.grace_s, self.close_soon, "no viewers")

    def _cancel_grace(self) -> None:
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None

    # -- viewers ------------------------------------------------------------------------------

    def add_viewer(self, viewer: Viewer) -> bool:
        if len(self.viewers) >= self.limits.max_viewers or self.closed:
            return False
        self._cancel_grace()
        self.viewers[viewer.id] = viewer
        if self.init is not None:
            self._start_viewer(viewer, self.init, self.cache.start())
        viewer.push_status(self.status())
        self.log.info("view.viewer_joined", viewer=viewer.id, viewers=len(self.viewers))
        return True

    def remove_viewer(self, viewer: Viewer, reason: str) -> None:
        if self.viewers.pop(viewer.id, None) is None:
            return
        self.log.info(
            "view.viewer_left",
            viewer=viewer.id,
            viewers=len(self.viewers),
            reason=reason,
            bytes_sent=viewer.bytes_sent,
            fragments_dropped=viewer.queue.fragments_dropped,
        )
        self._maybe_start_grace()

    def _start_viewer(self, viewer: Viewer, init: InitSegment, gop: list[Fragment]) -> None:
        viewer.queue.start(init, gop, json.dumps(self._stream_message(init)))
        viewer.wake.set()

    def _stream_message(self, init: InitSegment) -> dict[str, Any]:
        video = init.info.video
        return {
            "type": "stream",
            "mimeType": init.info.mime_type,
            "codecs": [t.codec for t in init.info.tracks],
            "videoCodec": init.video_codec,
            "audio": any(t.handler == "soun" for t in init.info.tracks),
            "width": video.width if video else 0,
            "height": video.height if video else 0,
            "generation": init.generation,
        }

    def status(self) -> dict[str, Any]:
        return {
            "type": "status",
            "state": self.state,
            "reason": self.reason,
            "viewers": len(self.viewers),
            "bitrateBps": self.bitrate_bps(),
        }

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(STATUS_EVERY_S)
            ending = self._session_ended()
            if ending is not None:
                self.close_soon(ending.code, ending)
                return
            status = self.status()
            for viewer in self.viewers.values():
                viewer.push_status(status)

    def _set_state(self, state: str, reason: str | None = None) -> None:
        if (state, reason) == (self.state, self.reason):
            return
        self.state, self.reason = state, reason
        status = self.status()
        for viewer in self.viewers.values():
            viewer.push_status(status)

    # -- from the remuxer ------------------------------------------------------------------------

    def on_init(self, init: InitSegment) -> None:
        if init.generation != self.generation or self.closed:
            return
        self.init = init
        self.cache.on_init(init)
        for viewer in self.viewers.values():
            self._start_viewer(viewer, init, [])
        self._set_state("live")
        self.log.info("view.stream", mime_type=init.info.mime_type, generation=init.generation)

    def on_fragment(self, fragment: Fragment) -> None:
        if fragment.generation != self.generation or self.closed:
            return
        now = time.monotonic()
        self._recent.append((now, len(fragment.data)))
        self.cache.on_fragment(fragment)
        for viewer in list(self.viewers.values()):
            offer = viewer.queue.offer(fragment, now)
            if offer is Offer.QUEUED:
                viewer.wake.set()
            elif offer is Offer.OVERFLOWED:
                self.log.info("view.viewer_behind", viewer=viewer.id, skipping_to="keyframe")
            elif offer is Offer.DISCONNECT:
                viewer.tell_to_go("too slow")

    def on_keyframe(self, keyframe: Keyframe) -> None:
        if keyframe.generation != self.generation or self.closed:
            return
        self.keyframe = keyframe
        self.keyframe_arrived.set()

    def bitrate_bps(self) -> int:
        now = time.monotonic()
        while self._recent and now - self._recent[0][0] > BITRATE_WINDOW_S:
            self._recent.popleft()
        return int(sum(size for _, size in self._recent) * 8 / BITRATE_WINDOW_S)

    # -- the camera connection ------------------------------------------------------------------

    async def _run(self) -> None:
        from tunnel_agent.cloud.relay.view.remux import remux

        backoff = Backoff(self.limits.retry_initial_s, self.limits.retry_max_s, 30.0)
        target = self.target
        while not self.closed:
            self.generation += 1
            self.init = None
            self.keyframe = None
            self.keyframe_arrived.clear()
            started = time.monotonic()
            try:
                self._link = link = await self._open_camera()
            except TunnelUnavailable as exc:
                reason = str(exc)
            else:
                self.links_opened += 1
                # The agent connects to the camera's port on its own host; the camera sees the
                # request URL only, and this is the one the session describes.
                url = f"rtsp://127.0.0.1:{target.local_port}{target.rtsp_path}"
                try:
                    await remux(
                        link.connect,
                        url,
                        self,
                        self.generation,
                        username=target.username,
                        password=target.password,
                        open_timeout_s=self.limits.open_timeout_s,
                        read_timeout_s=self.limits.read_timeout_s,
                    )
                    reason = link.failure() or "the camera's stream ended"
                except (CameraStreamError, TunnelUnavailable) as exc:
                    reason = str(exc)
                except RtspError as exc:
                    reason = link.failure() or _camera_failure(exc, self.init is not None)
                except Exception as exc:  # a defect: the stream is retried, and the defect logged
                    self.log.error("view.remux_failed", error=redact_text(repr(exc))[:200])
                    reason = link.failure() or "the camera's stream could not be read"
                finally:
                    self._link = None
                    link.close()
            if self.closed:
                return
            backoff.ran_for(time.monotonic() - started)
            delay = backoff.next_delay()
            self.log.warning(
                "view.stream_lost",
                reason=redact_text(reason),
                retry_in_s=round(delay, 1),
                generation=self.generation,
            )
            self._set_state("retrying", reason)
            await asyncio.sleep(delay)

    # -- snapshots ------------------------------------------------------------------------------

    async def snapshot(self) -> tuple[bytes, int, int]:
        """A JPEG of the latest keyframe (waiting for one if the watch has just started)."""
        self._holds += 1
        self._cancel_grace()
        try:
            async with asyncio.timeout(self.limits.snapshot_wait_s):
                await self.keyframe_arrived.wait()
            keyframe = self.keyframe
            assert keyframe is not None
            cached = self._snapshot
            if cached is not None and cached[:2] == (keyframe.generation, keyframe.sequence):
                return cached[2], cached[3], cached[4]
            from tunnel_agent.cloud.relay.view.snapshot import keyframe_to_jpeg

            jpeg, width, height = await asyncio.to_thread(keyframe_to_jpeg, keyframe)
            self._snapshot = (keyframe.generation, keyframe.sequence, jpeg, width, height)
            return jpeg, width, height
        finally:
            self._holds -= 1
            self._maybe_start_grace()


def _camera_failure(exc: RtspError, had_stream: bool) -> str:
    """A viewer-facing reason for a failed camera connection."""
    if had_stream and isinstance(exc, RtspConnectionLost):
        return "the camera's stream was interrupted"
    return str(exc)
