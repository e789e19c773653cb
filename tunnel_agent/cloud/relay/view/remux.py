"""RTSP in, fragmented MP4 out, without transcoding: one worker thread per camera connection.

PyAV (FFmpeg) reads the camera over RTSP with interleaved TCP (the only transport a byte tunnel
carries) and its MP4 muxer writes an init segment and then a fragment every
``FRAGMENT_DURATION_US`` (and at every keyframe), so frames leave the relay within a tenth of a
second instead of at the end of their group of pictures. A fragment per frame would cut that to
one frame but costs a hand-off to the event loop, a WebSocket message and a TLS record per frame
and viewer; a tenth of a second keeps the latency well under the 1.5 s target at a third of
that cost at 25 fps. Packets are copied as they are: H.264 and H.265 video, AAC audio when the
camera sends it. Nothing here runs on the event loop; results go out through ``RemuxSink``.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol

import av
import av.container
import av.error
import av.stream

from tunnel_agent.cloud.relay.view.boxes import (
    BoxSplitter,
    InitInfo,
    describe_init,
    fragment_starts_with_sync,
)
from tunnel_agent.cloud.relay.view.segments import (
    CameraStreamError,
    Fragment,
    InitSegment,
    Keyframe,
)

ANALYZE_DURATION_US = 500_000
PLAYABLE_VIDEO = ("h264", "hevc")
PASSED_AUDIO = ("aac",)
FRAGMENT_DURATION_US = 100_000
MUXER_OPTIONS = {
    # empty_moov: the init segment comes first and alone; default_base_moof: what MSE expects;
    # frag_keyframe: every keyframe starts a fragment (where a late joiner can start).
    "movflags": "frag_keyframe+empty_moov+default_base_moof",
    "frag_duration": str(FRAGMENT_DURATION_US),
    "flush_packets": "1",
}


class RemuxSink(Protocol):
    """Called from the worker thread; implementations hand over to their event loop."""

    def on_init(self, init: InitSegment) -> None: ...

    def on_fragment(self, fragment: Fragment) -> None: ...

    def on_keyframe(self, keyframe: Keyframe) -> None: ...


class _FragmentWriter:
    """The muxer's output file: cuts it into the init segment and fragments."""

    def __init__(self, sink: RemuxSink, generation: int, video_codec: str) -> None:
        self.sink = sink
        self.generation = generation
        self.video_codec = video_codec
        self._splitter = BoxSplitter()
        self._init: list[bytes] = []
        self._info: InitInfo | None = None
        self._moof: bytes | None = None
        self.bytes_out = 0

    def write(self, data: bytes) -> int:
        for kind, box in self._splitter.feed(bytes(data)):
            self._box(kind, box)
        return len(data)

    def _box(self, kind: bytes, box: bytes) -> None:
        if self._info is None:
            self._init.append(box)
            if kind == b"moov":
                self._info = describe_init(box)
                self.sink.on_init(
                    InitSegment(b"".join(self._init), self._info, self.generation, self.video_codec)
                )
            return
        if kind == b"moof":
            self._moof = box
        elif kind == b"mdat" and self._moof is not None:
            video = self._info.video
            keyframe = video is not None and fragment_starts_with_sync(self._moof, video.track_id)
            data = self._moof + box
            self.bytes_out += len(data)
            self.sink.on_fragment(Fragment(data, keyframe, self.generation, time.monotonic()))
            self._moof = None


def remux(
    url: str,
    sink: RemuxSink,
    stop: threading.Event,
    generation: int,
    *,
    open_timeout_s: float,
    read_timeout_s: float,
) -> None:
    """Read ``url`` until it ends, fails or ``stop`` is set; raise what ended it, if anything."""
    options = {
        "rtsp_transport": "tcp",
        "timeout": str(int(max(open_timeout_s, read_timeout_s) * 1_000_000)),
        # The SDP already describes the codecs; probing FFmpeg's default 5 s only delays the
        # first frame (half a second still finds the size and rate of an in-band-only SPS).
        "analyzeduration": str(ANALYZE_DURATION_US),
    }
    # No ``timeout=`` here: PyAV implements it with an interrupt callback that takes the GIL on
    # every read FFmpeg makes (two per interleaved RTP packet), which contends with the event
    # loop. FFmpeg's own socket ``timeout`` bounds connect and reads, and closing the watch
    # aborts the socket, which ends a read that waits.
    with av.open(url, "r", options=options) as source:
        video = _pick_video(source)
        audio = next(
            (s for s in source.streams.audio if s.codec_context.name in PASSED_AUDIO), None
        )
        inputs: list[av.stream.Stream] = [video] + ([audio] if audio is not None else [])
        codec = video.codec_context.name
        writer = _FragmentWriter(sink, generation, codec)
        with av.open(writer, "w", format="mp4", options=MUXER_OPTIONS) as output:
            outputs = {s.index: _output_stream(output, s) for s in inputs}
            _copy(source, output, inputs, outputs, sink=sink, stop=stop, generation=generation)


def _pick_video(source: av.container.InputContainer) -> av.stream.Stream:
    videos = list(source.streams.video)
    if not videos:
        raise CameraStreamError("the camera's stream has no video")
    playable = [s for s in videos if s.codec_context.name in PLAYABLE_VIDEO]
    if not playable:
        raise CameraStreamError(
            f"the camera sends {videos[0].codec_context.name} video; browsers play H.264 or H.265"
        )
    return playable[0]


def _output_stream(output: av.container.OutputContainer, source: av.stream.Stream) -> Any:
    stream = output.add_stream_from_template(source)
    if source.codec_context.name == "hevc":
        stream.codec_tag = "hvc1"  # parameter sets out of band: what browsers that play HEVC want
    return stream


def _copy(
    source: av.container.InputContainer,
    output: av.container.OutputContainer,
    inputs: list[av.stream.Stream],
    outputs: dict[int, Any],
    *,
    sink: RemuxSink,
    stop: threading.Event,
    generation: int,
) -> None:
    video = inputs[0]
    last_dts: dict[int, int] = {}
    extradata = video.codec_context.extradata
    codec = video.codec_context.name
    keyframes = 0
    for packet in source.demux(*inputs):
        if stop.is_set():
            return
        index = packet.stream.index
        dts = usable_dts(packet.dts, packet.pts, last_dts.get(index))
        if dts is None or packet.size == 0:
            continue
        packet.dts = dts
        if packet.pts is None:
            packet.pts = dts
        last_dts[index] = dts
        if index == video.index and packet.is_keyframe:
            keyframes += 1
            sink.on_keyframe(Keyframe(codec, extradata, bytes(packet), generation, keyframes))
        packet.stream = outputs[index]
        try:
            output.mux(packet)
        except (av.error.FFmpegError, ValueError) as exc:
            raise CameraStreamError(f"the camera's stream could not be remuxed: {exc}") from None


def usable_dts(dts: int | None, pts: int | None, last_dts: int | None) -> int | None:
    """The DTS to mux a packet with, or None to drop it.

    FFmpeg's MP4 muxer refuses packets without or with non-increasing timestamps. Over RTSP the
    first packet after PLAY (a keyframe, which a viewer needs) often has neither PTS nor DTS, and
    the next few only a PTS: the first gets 0, the others their PTS (exact without B-frames; with
    B-frames the PTS goes backwards and such packets are dropped, like any glitch).
    """
    if dts is None:
        dts = pts if pts is not None else (0 if last_dts is None else None)
    if dts is None or (last_dts is not None and dts <= last_dts):
        return None
    return dts
