"""RTSP in, fragmented MP4 out, without transcoding: one worker thread per camera connection.

PyAV (FFmpeg) reads the camera over RTSP with interleaved TCP (the only transport a byte tunnel
carries); ``fmp4`` writes the init segment and the fragments from the demuxed packets. The first
fragment starts at the first keyframe, and a fragment is cut at every keyframe and every
``FRAGMENT_DURATION_S``, so frames leave the relay within a tenth of a second instead of at the
end of their group of pictures. A fragment per frame would cut that to one frame but costs a
hand-off to the event loop, a WebSocket message and a TLS record per frame and viewer; a tenth of
a second keeps the latency well under the 1.5 s target at a third of that cost at 25 fps.
Packets are copied as they are: H.264 and H.265 video, AAC audio when the camera sends it.
Nothing here runs on the event loop; results go out through ``RemuxSink``, once per fragment.

No FFmpeg muxer runs here: through PyAV it would take every packet through ``mux`` and every
fragment back into Python through a file object, to be cut into boxes again.
"""

from __future__ import annotations

import threading
import time
from fractions import Fraction
from typing import Protocol

import av
import av.container
import av.error
import av.stream

from tunnel_agent.cloud.relay.view import fmp4
from tunnel_agent.cloud.relay.view.boxes import describe_init
from tunnel_agent.cloud.relay.view.segments import (
    CameraStreamError,
    Fragment,
    InitSegment,
    Keyframe,
)

ANALYZE_DURATION_US = 500_000
PLAYABLE_VIDEO = ("h264", "hevc")
PASSED_AUDIO = ("aac",)
FRAGMENT_DURATION_S = 0.1


class RemuxSink(Protocol):
    """Called from the worker thread; implementations hand over to their event loop."""

    def on_init(self, init: InitSegment) -> None: ...

    def on_fragment(self, fragment: Fragment) -> None: ...

    def on_keyframe(self, keyframe: Keyframe) -> None: ...


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
            (
                s
                for s in source.streams.audio
                if s.codec_context.name in PASSED_AUDIO and s.codec_context.extradata
            ),
            None,
        )
        _Remuxer(video, audio, sink, generation).run(source, stop)


def _pick_video(source: av.container.InputContainer) -> av.VideoStream:
    videos = list(source.streams.video)
    if not videos:
        raise CameraStreamError("the camera's stream has no video")
    playable = [s for s in videos if s.codec_context.name in PLAYABLE_VIDEO]
    if not playable:
        raise CameraStreamError(
            f"the camera sends {videos[0].codec_context.name} video; browsers play H.264 or H.265"
        )
    return playable[0]


class _Remuxer:
    """Packets of one camera connection to init segment, fragments and keyframes."""

    def __init__(
        self,
        video: av.VideoStream,
        audio: av.AudioStream | None,
        sink: RemuxSink,
        generation: int,
    ) -> None:
        self.video = video
        self.audio = audio
        self.sink = sink
        self.generation = generation
        context = video.codec_context
        self.codec = context.name
        self.extradata = context.extradata
        # Over RTSP FFmpeg hands H.264/H.265 over as Annex B (start codes); from MP4 or Matroska
        # as MP4 samples already are, with the configuration record as extradata.
        self.annexb = not (self.extradata and self.extradata[0] == 1)
        self.video_time_base = _time_base(video)
        self.video_timescale = self.video_time_base.denominator
        self.fragmenter: fmp4.Fragmenter | None = None
        self.video_origin = 0
        self.audio_origin = 0
        self.keyframes = 0

    def run(self, source: av.container.InputContainer, stop: threading.Event) -> None:
        inputs: list[av.stream.Stream] = [self.video]
        if self.audio is not None:
            inputs.append(self.audio)
        video_index = self.video.index
        last_dts: dict[int, int] = {}
        for packet in source.demux(*inputs):
            if stop.is_set():
                return
            index = packet.stream.index
            dts = usable_dts(packet.dts, packet.pts, last_dts.get(index))
            if dts is None or packet.size == 0:
                continue
            last_dts[index] = dts
            pts = dts if packet.pts is None else packet.pts
            if index == video_index:
                self._video(bytes(packet), dts, pts, packet.is_keyframe)
            elif self.fragmenter is not None:
                self._audio(bytes(packet), dts)
        if self.fragmenter is not None:
            self._send(self.fragmenter.flush())

    def _video(self, data: bytes, dts: int, pts: int, keyframe: bool) -> None:
        if keyframe:
            self.keyframes += 1
            self.sink.on_keyframe(
                Keyframe(self.codec, self.extradata, data, self.generation, self.keyframes)
            )
        if self.fragmenter is None:
            if not keyframe:
                return  # a viewer's decoder can start only at a keyframe
            self._start(data, dts)
        assert self.fragmenter is not None
        scale = self.video_timescale
        decode_time = fmp4.ticks(dts, self.video_time_base, scale) - self.video_origin
        offset = fmp4.ticks(pts, self.video_time_base, scale) - fmp4.ticks(
            dts, self.video_time_base, scale
        )
        sample = fmp4.Sample(
            fmp4.length_prefixed(fmp4.split_annexb(data)) if self.annexb else data,
            decode_time,
            offset,
            keyframe,
        )
        self._send(self.fragmenter.add_video(sample))

    def _audio(self, data: bytes, dts: int) -> None:
        assert self.fragmenter is not None and self.fragmenter.audio is not None
        track = self.fragmenter.audio
        decode_time = fmp4.ticks(dts, self.audio_time_base, track.timescale) - self.audio_origin
        if decode_time >= 0:  # audio from before the first keyframe has no picture to go with
            self.fragmenter.add_audio(fmp4.Sample(data, decode_time, 0, True))

    def _start(self, keyframe: bytes, dts: int) -> None:
        """The init segment, from the first keyframe's parameter sets (or the stream's)."""
        context = self.video.codec_context
        video = fmp4.VideoTrack(
            self.codec, context.width, context.height, self.video_timescale, self._config(keyframe)
        )
        audio = None
        if self.audio is not None:
            audio_context = self.audio.codec_context
            self.audio_time_base = _time_base(self.audio)
            audio = fmp4.AudioTrack(
                audio_context.sample_rate,
                audio_context.channels,
                self.audio_time_base.denominator,
                bytes(audio_context.extradata or b""),
            )
        self.fragmenter = fmp4.Fragmenter(video, audio, FRAGMENT_DURATION_S)
        self.video_origin = fmp4.ticks(dts, self.video_time_base, self.video_timescale)
        if audio is not None:
            origin_s = dts * self.video_time_base
            self.audio_origin = int(origin_s * audio.timescale)
        tracks: list[fmp4.Track] = [video] + ([audio] if audio is not None else [])
        data = fmp4.init_segment(tracks)
        moov = data[int.from_bytes(data[:4], "big") :]
        self.sink.on_init(InitSegment(data, describe_init(moov), self.generation, self.codec))

    def _config(self, keyframe: bytes) -> bytes:
        if not self.annexb:
            assert self.extradata is not None
            return bytes(self.extradata)
        units = fmp4.split_annexb(keyframe) + fmp4.split_annexb(bytes(self.extradata or b""))
        try:
            if self.codec == "h264":
                return fmp4.avcc(_first(units, fmp4.H264_SPS), _first(units, fmp4.H264_PPS))
            chroma, depth = _chroma_and_depth(self.video.codec_context.pix_fmt)
            return fmp4.hvcc(
                _first(units, fmp4.HEVC_VPS, hevc=True),
                _first(units, fmp4.HEVC_SPS, hevc=True),
                _first(units, fmp4.HEVC_PPS, hevc=True),
                chroma,
                depth,
            )
        except fmp4.UnusableStream as exc:
            raise CameraStreamError(str(exc)) from None

    def _send(self, done: tuple[bytes, bool] | None) -> None:
        if done is not None:
            data, keyframe = done
            self.sink.on_fragment(Fragment(data, keyframe, self.generation, time.monotonic()))


def _time_base(stream: av.stream.Stream) -> Fraction:
    time_base = stream.time_base
    if time_base is None:
        raise CameraStreamError("the camera's stream has no time base")
    return Fraction(time_base)


def _first(units: list[bytes], nal_type: int, *, hevc: bool = False) -> list[bytes]:
    """The first parameter set of ``nal_type`` (in-band ones come first: they are current)."""
    kind = fmp4.hevc_type if hevc else fmp4.h264_type
    found = [u for u in units if kind(u) == nal_type]
    return found[:1]


def _chroma_and_depth(pix_fmt: str | None) -> tuple[int, int]:
    """hvcC's chroma_format_idc and bit depth, from FFmpeg's pixel format name."""
    name = pix_fmt or "yuv420p"
    chroma = 0 if name.startswith("gray") else 3 if "444" in name else 2 if "422" in name else 1
    depth = 12 if "12" in name else 10 if "10" in name else 8
    return chroma, depth


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
