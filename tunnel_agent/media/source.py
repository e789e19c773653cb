"""One connection per camera, shared by all of its tasks.

A worker thread owns the PyAV container for its whole life (no PyAV call runs on the event loop):
it opens the source with a deadline, demuxes once, copies each video packet to the packet tasks,
decodes only for snapshot tasks (keyframes only when their rates allow) and hands paced frames to
them. Every open and read is bounded; a source that delivers no packet for ``watchdog`` seconds is
restarted; reconnects back off exponentially with jitter and the backoff resets after a stable
period. Files loop (paced in real time) so tasks see a continuous source; folders cycle through
their images and videos.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import av.container
import av.stream
import av.video.frame
import av.video.stream

from tunnel_agent.logs import EventLogger, redact_text
from tunnel_agent.media.backoff import Backoff
from tunnel_agent.media.pacing import (
    KeyframeRate,
    SnapshotPacer,
    TimestampValidator,
    backfill_dts,
    forward_dts,
    keyframes_suffice,
)
from tunnel_agent.media.packets import CapturedFrame, MediaPacket, StreamTemplate
from tunnel_agent.media.settings import MediaSettings
from tunnel_agent.media.tasks.base import FrameTask, PacketTask
from tunnel_agent.media.urls import SourceAddress, SourceKind, rtsp_input_options

RESET_AFTER_S = 1.0  # a DTS this far back is the source restarting its clock, not reordering
MAX_WAITING_PACKETS = 16  # packets held while the demuxer gives no DTS
MAX_UNDECODED_PACKETS = 600  # compressed packets kept for a snapshot not yet due (bounded)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mkv", ".mp4", ".mov", ".avi", ".ts", ".mts", ".flv", ".webm", ".mpg", ".mpeg"}


class SourceState(enum.Enum):
    CONNECTING = "connecting"
    RUNNING = "running"
    BACKING_OFF = "backing off"
    STOPPED = "stopped"


class SourceStalled(Exception):
    """The watchdog saw no packet for too long."""


class _Timeline:
    """One pass over a container: DTS given to packets that lack one, shifted, validated."""

    def __init__(self, continue_at: int | None) -> None:
        self.continue_at = continue_at
        self.offset: int | None = None if continue_at is not None else 0
        self.validator = TimestampValidator()
        self.end: int | None = None  # where a following pass should start
        self._waiting: list[av.Packet[Any]] = []
        self._last_dts: int | None = None  # raw, as the demuxer counts

    def place(self, packet: av.Packet[Any]) -> tuple[list[tuple[av.Packet[Any], int]], int]:
        """Packets ready to go on, in order, each with its DTS; and how many were dropped.

        A packet without a DTS waits for the next one that has it and is then given one just
        below (B-frame files); a stream that gives none for a while is counted on in steps.
        """
        waiting = self._waiting
        step = int((waiting[0] if waiting else packet).duration or 0)
        if packet.dts is None:
            waiting.append(packet)
            if len(waiting) < MAX_WAITING_PACKETS:
                return [], 0
            values: list[int | None] = list(
                forward_dts(len(waiting), self._last_dts, waiting[0].pts, step)
            )
        else:
            values = [*backfill_dts(len(waiting), packet.dts, self._last_dts, step), packet.dts]
            waiting.append(packet)
        ready = [(p, dts) for p, dts in zip(waiting, values, strict=True) if dts is not None]
        self._waiting = []
        if ready:
            self._last_dts = ready[-1][1]
        return ready, len(values) - len(ready)

    def shifted(self, raw_dts: int) -> int:
        if self.offset is None:
            assert self.continue_at is not None
            self.offset = self.continue_at - raw_dts
        return raw_dts + self.offset


class SourceBase:
    """What every kind of source shares: state, counters, and handing paced frames to tasks."""

    def __init__(
        self,
        camera: str,
        address: SourceAddress,
        settings: MediaSettings,
        frame_tasks: list[FrameTask],
    ) -> None:
        self.camera = camera
        self.address = address
        self.settings = settings
        self.frame_tasks = frame_tasks
        self.log = EventLogger("tunnel_agent.media").bind(camera=camera, source=address.display)
        self.state = SourceState.CONNECTING
        self.reason: str | None = None
        self.counters: Counter[str] = Counter()
        self.last_packet_at: float | None = None
        self._pacers = [SnapshotPacer(t.rate_per_s) for t in frame_tasks]
        self._backoff = Backoff(
            settings.backoff_initial, settings.backoff_max, settings.stable_after
        )

    def status(self) -> dict[str, Any]:
        last = self.last_packet_at
        age = None if last is None else round(time.monotonic() - last, 1)
        return {
            "state": self.state.value,
            "reason": self.reason,
            "last_packet_age_s": age,
            **dict(self.counters),
        }

    def _deliver(
        self,
        frame: av.video.frame.VideoFrame | None,
        image: bytes | None,
        image_format: str | None,
        *,
        arrived_at: float | None = None,
        keyframe: bool = False,
    ) -> None:
        """Hand a frame to the tasks it is due for; ``arrived_at`` (monotonic) is when its packet
        came, which decides (decoding a group of pictures takes a while)."""
        now = time.monotonic() if arrived_at is None else arrived_at
        captured = CapturedFrame(datetime.now(UTC), frame, image, image_format)
        for task, pacer in zip(self.frame_tasks, self._pacers, strict=True):
            if pacer.due(now, keyframe=keyframe):
                task.on_frame(captured)

    def _set_state(self, state: SourceState, reason: str | None = None, **fields: Any) -> None:
        if state is self.state and reason == self.reason and state is not SourceState.CONNECTING:
            return
        self.state, self.reason = state, reason
        log = self.log.warning if state is SourceState.BACKING_OFF else self.log.info
        log("media.source_state", state=state.value, reason=reason, **fields)


class CameraSource(SourceBase):
    """PyAV sources: RTSP(S), files, folders and V4L2 devices."""

    def __init__(
        self,
        camera: str,
        address: SourceAddress,
        settings: MediaSettings,
        packet_tasks: list[PacketTask],
        frame_tasks: list[FrameTask],
        *,
        ca_file: Path | None = None,
    ) -> None:
        super().__init__(camera, address, settings, frame_tasks)
        self.packet_tasks = packet_tasks
        self.ca_file = ca_file
        self.keyframes_only = False
        self._keyframe_rate = KeyframeRate()
        self._stop = threading.Event()
        self._restart = threading.Event()
        self._generation = 0
        self._undecoded: list[av.Packet[Any]] = []  # since the last keyframe, for snapshots
        self._thread = threading.Thread(target=self._run, name=f"source-{camera}", daemon=True)

    # -- control (any thread) -----------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.settings.watchdog + self.settings.open_timeout)

    def check_watchdog(self, now: float) -> bool:
        """Ask for a restart if packets stopped; True when it did (called periodically)."""
        last = self.last_packet_at
        if (
            self.state is SourceState.RUNNING
            and last is not None
            and now - last > self.settings.watchdog
        ):
            if not self._restart.is_set():
                self.counters["watchdog_restarts"] += 1
                self.log.warning("media.source_stalled", silent_s=round(now - last, 1))
                self._restart.set()
            return True
        return False

    def status(self) -> dict[str, Any]:
        return {**super().status(), "keyframes_only": self.keyframes_only}

    # -- the worker thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self._set_state(SourceState.CONNECTING)
            try:
                self._stream()
                reason = "source ended"
            except SourceStalled:
                reason = f"no packets for {self.settings.watchdog:g} s"
            except Exception as exc:
                reason = _describe(exc)
            if self._stop.is_set():
                break
            self._backoff.ran_for(time.monotonic() - started)
            delay = self._backoff.next_delay()
            self.counters["reconnects"] += 1
            self._set_state(SourceState.BACKING_OFF, reason, retry_in_s=round(delay, 1))
            self._stop.wait(delay)
        self._set_state(SourceState.STOPPED)

    def _stream(self) -> None:
        kind = self.address.kind
        if kind is SourceKind.FOLDER:
            self._stream_folder()
        elif kind is SourceKind.FILE:
            self._stream_file(self.address.open_url, loop=True)
        else:
            with self._open(self.address.open_url) as container:
                self._demux(container, live=True)

    def _open(self, url: str) -> av.container.InputContainer:
        options: dict[str, str] = {}
        container_format: str | None = None
        kind = self.address.kind
        if kind is SourceKind.RTSP:
            options = rtsp_input_options(url, self.ca_file, self.settings.watchdog)
        elif kind is SourceKind.V4L2:
            container_format = "v4l2"
        self._restart.clear()
        container: av.container.InputContainer = av.open(
            url,
            "r",
            format=container_format,
            options=options,
            timeout=(self.settings.open_timeout, self.settings.watchdog),
        )
        return container

    def _new_generation(self, stream: av.stream.Stream) -> None:
        self._generation += 1
        self._undecoded.clear()
        template = StreamTemplate(stream, self._generation)
        for task in self.packet_tasks:
            task.on_stream(template)

    def _demux(
        self,
        container: av.container.InputContainer,
        *,
        live: bool,
        continue_at: int | None = None,
        pace: bool = False,
    ) -> int | None:
        """Move packets until the source ends; return where a following loop's DTS should start.

        ``continue_at`` (file loops) shifts this pass so that its first DTS lands there: a file
        whose timestamps start below zero (B-frames) still follows on from the last loop.
        """
        if not container.streams.video:
            raise ValueError("the source has no video stream")
        stream = container.streams.video[0]
        if self.frame_tasks:
            # Slices in parallel, never whole frames: frame threads hold a decoded picture each
            # (tens of MiB at 1080p) and add a frame of delay per thread, for no less CPU.
            stream.thread_type = "SLICE"
        if continue_at is None:
            self._new_generation(stream)
        timeline = _Timeline(continue_at)
        try:
            self._move_packets(container, stream, timeline, live, pace)
        finally:
            for task in self.packet_tasks:
                task.flush()  # what was batched goes on, also when the source stalls or fails
        return timeline.end

    def _move_packets(
        self,
        container: av.container.InputContainer,
        stream: av.video.stream.VideoStream,
        timeline: _Timeline,
        live: bool,
        pace: bool,
    ) -> None:
        paced_from: tuple[float, float] | None = None
        # The demuxer gives each packet its stream's time base; PyAV builds a new Fraction on
        # every read of it, so it is read once here.
        time_base = stream.time_base
        if time_base is None:
            raise ValueError("the video stream has no time base")
        for packet in container.demux(stream):
            if self._stop.is_set():
                return
            if self._restart.is_set():
                raise SourceStalled
            if packet.size == 0:
                continue  # the demuxer's end-of-stream marker
            ready, dropped = timeline.place(packet)
            self.counters["packets_dropped_bad_timestamps"] += dropped
            for item, raw_dts in ready:
                dts = timeline.shifted(raw_dts)
                if not self._usable(stream, timeline.validator, dts, time_base):
                    continue
                now = time.monotonic()
                self.last_packet_at = now  # only packets the tasks can use count for the watchdog
                timeline.end = dts + max(int(item.duration or 0), 1)
                if pace:
                    seconds = float(dts * time_base)
                    paced_from = paced_from or (now, seconds)
                    wait = paced_from[0] + (seconds - paced_from[1]) - now
                    if wait > 0 and self._stop.wait(wait):
                        return
                self._forward(
                    stream, item, dts, timeline.offset or 0, time_base=time_base, live=live
                )

    def _usable(
        self,
        stream: av.stream.Stream,
        validator: TimestampValidator,
        dts: int,
        time_base: Fraction,
    ) -> bool:
        """Whether a packet's DTS may go on; a clock that restarted starts a new timeline."""
        if validator.is_valid(dts):
            return True
        if not validator.jumped_back(dts, int(RESET_AFTER_S / time_base)):
            self.counters["packets_dropped_bad_timestamps"] += 1
            return False
        # The server restarted its clock (a shared RTSP stream does when a client joins):
        # a new timeline for the tasks, not minutes of dropped packets.
        self.counters["timestamp_resets"] += 1
        self.log.warning(
            "media.timestamps_reset", back_s=round(validator.back_s(dts, time_base), 1)
        )
        validator.restart(dts)
        self._new_generation(stream)
        return True

    def _forward(
        self,
        stream: av.video.stream.VideoStream,
        packet: av.Packet[Any],
        dts: int,
        offset: int,
        *,
        time_base: Fraction,
        live: bool,
    ) -> None:
        """Hand one usable packet to the packet tasks and the decoder."""
        if self.state is not SourceState.RUNNING:
            self._set_state(SourceState.RUNNING, codec=stream.codec_context.name, live=live)
        self.counters["packets"] += 1
        if packet.is_keyframe:
            self._keyframe_rate.keyframe(time.monotonic())
        if self.packet_tasks:
            media = MediaPacket(
                data=bytes(packet),
                pts=packet.pts + offset if packet.pts is not None else None,
                dts=dts,
                time_base=time_base,
                is_keyframe=packet.is_keyframe,
                generation=self._generation,
                captured_at=time.time(),
            )
            for task in self.packet_tasks:
                task.on_packet(media)
        if self.frame_tasks:
            self._decode(stream, packet)

    def _decode(self, stream: av.video.stream.VideoStream, packet: av.Packet[Any]) -> None:
        """Decode only what a snapshot needs: up to the packet at which one falls due.

        Packets since the last keyframe wait, undecoded; when a snapshot task is due they are
        decoded in one go and the newest frame is delivered. What remains of a group of pictures
        when the next keyframe arrives was never needed and is never decoded. A snapshot falls on
        a keyframe whenever the pacer's tolerance allows (see ``SnapshotPacer``): a keyframe a
        little early is on time and restarts the schedule, and a snapshot due just before the
        next keyframe waits for it, so at 1/s on a camera with a keyframe every 2 s each group
        costs its keyframe and the frames up to the middle one. When every rate is at most the
        keyframe rate, only keyframes are decoded.
        """
        context = stream.codec_context
        if packet.is_keyframe:
            wanted = keyframes_suffice(
                [t.rate_per_s for t in self.frame_tasks],
                self._keyframe_rate.per_second,
                currently=self.keyframes_only,
            )
            if wanted != self.keyframes_only:
                self.keyframes_only = wanted
                self.log.info("media.decode_policy", keyframes_only=wanted)
            self._undecoded.clear()
        elif self.keyframes_only:
            return
        self._undecoded.append(packet)
        # Early is on time only for a keyframe, and a frame just before one leaves its snapshot to
        # it: either would cost the decoding of the whole group of pictures for an image the
        # keyframe gives a moment later.
        now, keyframe = time.monotonic(), packet.is_keyframe
        pacers = [pacer for pacer in self._pacers if pacer.is_due(now, early=keyframe)]
        next_keyframe_at = None if keyframe else self._keyframe_rate.next_at
        due = bool(pacers) and not all(
            pacer.waits_for_keyframe(now, next_keyframe_at) for pacer in pacers
        )
        if not due and len(self._undecoded) < MAX_UNDECODED_PACKETS:
            return
        # Only the newest frame is kept: each one held would keep a picture of FFmpeg's frame pool
        # (3 MiB at 1080p) in use, and a group of pictures decoded in one go is up to 50 of them.
        newest: av.VideoFrame | None = None
        decoded = 0
        for waiting in self._undecoded:
            for frame in context.decode(waiting):
                newest, decoded = frame, decoded + 1
        self._undecoded.clear()
        if self.keyframes_only:
            # A decoder with a reordering delay would hold the keyframe back until the next one.
            for frame in context.decode(None):
                newest, decoded = frame, decoded + 1
            context.flush_buffers()
        self.counters["frames_decoded"] += decoded
        if due and newest is not None:
            self._deliver(newest, None, None, arrived_at=now, keyframe=keyframe)

    def _stream_file(self, path: str, *, loop: bool) -> None:
        """A media file, in real time; looped so that tasks see a continuous source."""
        continue_at: int | None = None
        while not self._stop.is_set():
            with self._open(path) as container:
                end = self._demux(container, live=False, continue_at=continue_at, pace=True)
            if not loop or end is None:
                return
            continue_at = end

    def _stream_folder(self) -> None:
        """Each image for ``folder_image_interval`` seconds, each video once; then again."""
        assert self.address.path is not None
        while not self._stop.is_set():
            entries = list(_media_files(self.address.path))
            if not entries:
                raise ValueError(f"no images or videos in {self.address.path}")
            for entry in entries:
                if self._stop.is_set():
                    return
                if entry.suffix.lower() in IMAGE_SUFFIXES:
                    self._show_image(entry)
                else:
                    self._stream_file(str(entry), loop=False)

    def _show_image(self, path: Path) -> None:
        with av.open(str(path), "r") as container:
            frame = next(container.decode(video=0))
        self.last_packet_at = time.monotonic()
        if self.state is not SourceState.RUNNING:
            self._set_state(SourceState.RUNNING, live=False)
        self.counters["images"] += 1
        self._deliver(frame, None, None)
        self._stop.wait(self.settings.folder_image_interval)


def _media_files(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES:
            yield path


def _describe(exc: BaseException) -> str:
    """A reason for logs: FFmpeg messages quote the URL, which may carry credentials."""
    return redact_text(f"{type(exc).__name__}: {exc}")
