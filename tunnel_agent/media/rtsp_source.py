"""RTSP(S) cameras read on the agent's event loop with ``tunnel_agent.rtsp``, not PyAV's demuxer.

FFmpeg's RTSP reader, in a thread of its own, polls and reads the socket for every RTP packet
(~1,270 of each a second for a 1080p25 4 Mbit/s camera): that alone cost as much CPU as ffmpeg's
whole ``-c copy`` process. Here the camera's bytes arrive on the event loop a few times a second in
large reads (the client pauses reading between them), the depacketiser turns RTP into access units
and each becomes the ``MediaPacket`` the tasks got from PyAV: Annex B, presentation time from RTP
(90 kHz, extended past the 32-bit wrap), a decoding time that always increases (B-frames included,
``decode_order``). The codec parameters come from the first keyframe of each connection
(``StreamTemplate.from_bitstream``). Snapshot tasks still decode with PyAV, in a thread of their
own fed whole groups of packets only when a snapshot falls due, paced on the camera's timestamps.

As with the PyAV source: every open and read is bounded (``open_timeout``, ``watchdog``), a camera
that gives no usable packet for ``watchdog`` seconds is reconnected, reconnects back off, and a new
connection, a change of parameter sets or a clock that jumps starts a new generation for the tasks.
Credentials go only in the camera's authentication exchange (Basic or Digest), never in a log.
"""

from __future__ import annotations

import asyncio
import queue
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import av
import av.video.frame

from tunnel_agent import __version__
from tunnel_agent.logs import EventLogger
from tunnel_agent.media.pacing import DecodeStep, SnapshotPlan
from tunnel_agent.media.packets import CapturedFrame, MediaPacket, StreamTemplate
from tunnel_agent.media.settings import MediaSettings
from tunnel_agent.media.source import (
    MAX_UNDECODED_PACKETS,
    RESET_AFTER_S,
    SourceBase,
    SourceState,
)
from tunnel_agent.media.tasks.base import FrameTask, PacketTask
from tunnel_agent.media.urls import SourceAddress, without_credentials
from tunnel_agent.rtsp.client import RtspClient
from tunnel_agent.rtsp.codec_info import h264_reorder_frames, h265_reorder_frames
from tunnel_agent.rtsp.decode_order import DecodeOrder
from tunnel_agent.rtsp.depacketize import H264Depacketizer, H265Depacketizer, VideoAccessUnit
from tunnel_agent.rtsp.errors import RtspError, RtspProtocolError, RtspTimeout
from tunnel_agent.rtsp.sdp import MediaDescription, SessionDescription

READ_INTERVAL_S = 0.05  # at 4 Mbit/s the kernel gathers ~25 KB meanwhile: one read, not 30
VIDEO_CODECS = {"H264": "h264", "H265": "hevc"}  # RTP encoding name: FFmpeg's codec name
H264_SPS, H265_SPS = 7, 33
DEFAULT_REORDER_FRAMES = 2  # an H.264 SPS that does not say: B-frames, maybe in a pyramid
DEFAULT_FRAME_RATE = 25
JUMP_AHEAD_S = 10.0  # a presentation time this far ahead is a new clock, not a late frame
DECODER_QUEUE_STEPS = 8
START_CODE = b"\x00\x00\x00\x01"
DEFAULT_PORTS = {"rtsp": 554, "rtsps": 322}


def annex_b(units: list[bytes]) -> bytes:
    """NAL units with start codes, as FFmpeg's RTSP reader hands them out."""
    return b"".join(START_CODE + unit for unit in units)


def nal_kind(codec: str, unit: bytes) -> int:
    return (unit[0] >> 1) & 0x3F if codec == "hevc" else unit[0] & 0x1F


def pick_video(description: SessionDescription) -> MediaDescription:
    """The first H.264 or H.265 video the camera describes."""
    videos = [m for m in description.media if m.kind == "video"]
    for media in videos:
        if media.encoding in VIDEO_CODECS:
            return media
    if videos:
        name = videos[0].encoding or "unknown"
        raise RtspProtocolError(f"the camera sends {name} video; this reader takes H.264 or H.265")
    raise RtspProtocolError("the source has no video stream")


def reorder_frames(codec: str, sps: bytes) -> int:
    """How many frames the camera's encoder reorders (B-frames), from its SPS."""
    if codec == "hevc":
        return h265_reorder_frames(sps)
    depth = h264_reorder_frames(sps)
    return DEFAULT_REORDER_FRAMES if depth is None else depth


@dataclass(frozen=True, slots=True)
class _Undecoded:
    data: bytes
    pts: int
    keyframe: bool
    captured_at: float  # wall clock


class _Generation:
    """One run of timestamps the tasks can follow: a connection's, until its clock jumps."""

    def __init__(self, number: int, codec: str, sps: bytes, origin: int, clock_rate: int) -> None:
        self.number = number
        self.sps = sps
        self.origin = origin  # the extended RTP time of the first keyframe: pts 0
        self.order = DecodeOrder(reorder_frames(codec, sps), clock_rate // DEFAULT_FRAME_RATE)
        self.last_pts = 0


class RtspCameraSource(SourceBase):
    """An RTSP or RTSPS camera over interleaved TCP, on the running event loop."""

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
        self.url = without_credentials(address.open_url)
        self._run_task: asyncio.Task[None] | None = None
        self._client: RtspClient | None = None
        self._generation_count = 0
        self._generation: _Generation | None = None
        self._codec = "h264"
        self._clock_rate = 90000
        self._time_base = Fraction(1, 90000)
        self._depacketizer: H264Depacketizer | H265Depacketizer | None = None
        self._plan: SnapshotPlan[_Undecoded] | None = None
        self._decoder = (
            SnapshotDecoder(camera, frame_tasks, self.counters, self.log) if frame_tasks else None
        )

    @property
    def keyframes_only(self) -> bool:
        return self._plan.keyframes_only if self._plan is not None else False

    # -- control (on the event loop) ------------------------------------------------------------

    def start(self) -> None:
        if self._decoder is not None:
            self._decoder.start()
        self._run_task = asyncio.get_running_loop().create_task(self._run())

    async def stop_async(self) -> None:
        if self._run_task is not None:
            self._run_task.cancel()
            await asyncio.gather(self._run_task, return_exceptions=True)
        if self._decoder is not None:
            await asyncio.to_thread(self._decoder.stop)
        self._set_state(SourceState.STOPPED)

    def check_watchdog(self, now: float) -> bool:
        """End the session if usable packets stopped; True when it did (called periodically)."""
        last = self.last_packet_at
        if self.state is not SourceState.RUNNING or last is None:
            return False
        if now - last <= self.settings.watchdog:
            return False
        client = self._client
        if client is not None:
            self.counters["watchdog_restarts"] += 1
            self.log.warning("media.source_stalled", silent_s=round(now - last, 1))
            self._client = None
            client.fail(RtspTimeout(f"no packets for {self.settings.watchdog:g} s"))
        return True

    def status(self) -> dict[str, Any]:
        return {**super().status(), "keyframes_only": self.keyframes_only, "reader": "rtsp"}

    # -- the session ----------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            self._set_state(SourceState.CONNECTING)
            try:
                await self._session()
                reason = "source ended"
            except RtspError as exc:
                reason = str(exc)
            except TimeoutError:
                opening_s = self.settings.open_timeout
                reason = f"the camera did not open its stream within {opening_s:g} s"
            except (OSError, ValueError, av.FFmpegError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            self._backoff.ran_for(time.monotonic() - started)
            delay = self._backoff.next_delay()
            self.counters["reconnects"] += 1
            self._set_state(SourceState.BACKING_OFF, reason, retry_in_s=round(delay, 1))
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        parts = urlsplit(self.url)
        scheme = parts.scheme.lower()
        host = parts.hostname or ""
        port = parts.port or DEFAULT_PORTS[scheme]
        tls = None
        if scheme == "rtsps":
            tls = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        client = RtspClient(
            self.url,
            username=self.address.username,
            password=self.address.password,
            request_timeout_s=self.settings.open_timeout,
            read_timeout_s=self.settings.watchdog,
            user_agent=f"tunnel-agent/{__version__}",
            read_interval_s=READ_INTERVAL_S,
        )
        self._generation = None
        try:
            async with asyncio.timeout(self.settings.open_timeout):
                await client.connect(host, port, tls)
                video = pick_video(await client.describe())
                self._codec = VIDEO_CODECS[video.encoding]
                self._clock_rate = video.clock_rate or 90000
                self._time_base = Fraction(1, self._clock_rate)
                if self._codec == "h264":
                    depacketizer: H264Depacketizer | H265Depacketizer = H264Depacketizer.from_sdp(
                        video, self._on_unit
                    )
                else:
                    depacketizer = H265Depacketizer.from_sdp(video, self._on_unit)
                self._depacketizer = depacketizer
                await client.setup(video, depacketizer)
                await client.play()
            self._client = client
            await client.wait()
        finally:
            self._client = None
            for task in self.packet_tasks:
                task.flush()  # what was batched goes on, also when the camera stalls or fails
            await client.close()

    # -- access units (in the client's data_received) -------------------------------------------

    def _on_unit(self, unit: VideoAccessUnit) -> None:
        generation = self._generation
        if generation is not None:
            pts = unit.timestamp - generation.origin
            step = pts - generation.last_pts
            if not -RESET_AFTER_S * self._clock_rate < step < JUMP_AHEAD_S * self._clock_rate:
                # The camera restarted its clock: a new timeline for the tasks.
                self.counters["timestamp_resets"] += 1
                self.log.warning("media.timestamps_reset", step_s=round(step / self._clock_rate, 1))
                generation = self._generation = None
            elif unit.keyframe and self._sps() != generation.sps:
                generation = self._generation = None  # new parameter sets: a new template
        if generation is None:
            if not unit.keyframe:
                self.counters["packets_before_keyframe"] += 1
                return
            generation = self._start_generation(unit)
            if generation is None:
                return
        pts = unit.timestamp - generation.origin
        generation.last_pts = pts
        dts = generation.order.dts(pts)
        if dts is None:
            self.counters["packets_dropped_bad_timestamps"] += 1
            return
        now = time.monotonic()
        self.last_packet_at = now
        if self.state is not SourceState.RUNNING:
            self._set_state(SourceState.RUNNING, codec=self._codec, live=True)
        self.counters["packets"] += 1
        data = annex_b(unit.units)
        captured_at = time.time()
        if self.packet_tasks:
            packet = MediaPacket(
                data, pts, dts, self._time_base, unit.keyframe, generation.number, captured_at
            )
            for task in self.packet_tasks:
                task.on_packet(packet)
        plan = self._plan
        if plan is not None and self._decoder is not None:
            keyframes_only = plan.keyframes_only
            decode = plan.add(
                _Undecoded(data, pts, unit.keyframe, captured_at),
                keyframe=unit.keyframe,
                now=dts / self._clock_rate,  # the camera's clock: arrival jitter changes nothing
            )
            if plan.keyframes_only != keyframes_only:
                self.log.info("media.decode_policy", keyframes_only=plan.keyframes_only)
            if decode is not None:
                self._decoder.submit(decode)

    def _sps(self) -> bytes:
        assert self._depacketizer is not None
        kind = H264_SPS if self._codec == "h264" else H265_SPS
        return self._depacketizer.parameter_sets.get(kind, b"")

    def _start_generation(self, unit: VideoAccessUnit) -> _Generation | None:
        """A new template from this keyframe and the parameter sets known now."""
        assert self._depacketizer is not None
        sps = self._sps()
        if not sps:
            self.counters["keyframes_unusable"] += 1
            return None
        # Each parameter set once, then the keyframe's other units: FFmpeg puts every copy of a
        # parameter set it finds into the extradata, and its RTSP muxer refuses duplicates.
        depacketizer = self._depacketizer
        sets = [u for _, u in sorted(depacketizer.parameter_sets.items())]
        kinds = depacketizer.parameter_set_types
        rest = [u for u in unit.units if nal_kind(self._codec, u) not in kinds]
        try:
            template = StreamTemplate.from_bitstream(
                self._codec,
                annex_b(sets + rest),
                self._time_base,
                self._generation_count + 1,
            )
        except (av.FFmpegError, ValueError) as exc:
            self.counters["keyframes_unusable"] += 1
            self.log.warning("media.keyframe_unusable", reason=f"{type(exc).__name__}: {exc}")
            return None
        self._generation_count += 1
        generation = _Generation(
            self._generation_count, self._codec, sps, unit.timestamp, self._clock_rate
        )
        self._generation = generation
        for task in self.packet_tasks:
            task.on_stream(template)
        if self._decoder is not None:
            rates = [t.rate_per_s for t in self.frame_tasks]
            self._plan = SnapshotPlan(rates, MAX_UNDECODED_PACKETS)
            extradata = template.stream.codec_context.extradata or b""
            self._decoder.new_stream(self._codec, extradata)
        return generation


class SnapshotDecoder:
    """PyAV decoding for snapshot tasks, in a thread of its own (no decoding on the event loop).

    It is handed whole steps of a ``SnapshotPlan`` (a wake-up per snapshot, not per packet), decodes
    them in order with one codec context per generation and gives the newest frame to the tasks
    that are due. A step that finds the queue full is dropped, and so is every step after it up to
    the next keyframe, since they continue the pictures the dropped one held.
    """

    def __init__(
        self, camera: str, tasks: list[FrameTask], counters: Counter[str], log: EventLogger
    ) -> None:
        self.tasks = tasks
        self.counters = counters
        self.log = log
        self._queue: queue.Queue[Any] = queue.Queue(DECODER_QUEUE_STEPS)
        self._broken = False
        self._thread = threading.Thread(target=self._run, name=f"decode-{camera}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def new_stream(self, codec: str, extradata: bytes) -> None:
        self._broken = False
        self._queue.put(("stream", codec, extradata))

    def submit(self, step: DecodeStep[_Undecoded]) -> None:
        if self._broken and not (step.packets and step.packets[0].keyframe):
            self.counters["snapshot_packets_skipped"] += len(step.packets)
            return
        try:
            self._queue.put_nowait(step)
            self._broken = False
        except queue.Full:
            self._broken = True
            self.counters["snapshot_packets_skipped"] += len(step.packets)

    def _run(self) -> None:
        context: Any = None
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, tuple):
                _, codec, extradata = item
                context = av.CodecContext.create(codec, "r")
                context.extradata = extradata
                # Slices in parallel, never whole frames: frame threads hold a decoded picture
                # each (tens of MiB at 1080p) and add a frame of delay per thread.
                context.thread_type = "SLICE"
                continue
            if context is not None:
                try:
                    self._decode(context, item)
                except av.FFmpegError as exc:
                    self.counters["decode_errors"] += 1
                    self.log.warning("media.decode_failed", error=f"{type(exc).__name__}: {exc}")

    def _decode(self, context: Any, step: DecodeStep[_Undecoded]) -> None:
        # Only the newest frame is kept: each one held would keep a picture of FFmpeg's frame pool
        # (3 MiB at 1080p) in use, and a group of pictures decoded in one go is up to 50 of them.
        newest: av.video.frame.VideoFrame | None = None
        decoded = 0
        for waiting in step.packets:
            packet = av.Packet(waiting.data)
            packet.pts = waiting.pts
            for frame in context.decode(packet):
                newest, decoded = frame, decoded + 1
        if step.drain:
            for frame in context.decode(None):
                newest, decoded = frame, decoded + 1
            context.flush_buffers()
        self.counters["frames_decoded"] += decoded
        if newest is None or not step.due or not step.packets:
            return
        captured = CapturedFrame(datetime.fromtimestamp(step.packets[-1].captured_at, UTC), newest)
        for index in step.due:
            self.tasks[index].on_frame(captured)
