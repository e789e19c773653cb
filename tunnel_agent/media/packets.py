"""What a camera source hands its tasks: immutable packets and a codec template per connection."""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import datetime
from fractions import Fraction
from typing import Any

import av
import av.container
import av.stream
import av.video.frame

RAW_FORMATS = {"h264": "h264", "hevc": "hevc"}  # FFmpeg's codec name: its raw bitstream format


@dataclass(frozen=True, slots=True)
class MediaPacket:
    """One video packet, copied out of the demuxer so any task thread may use it."""

    data: bytes
    pts: int | None
    dts: int
    time_base: Fraction
    is_keyframe: bool
    generation: int
    captured_at: float  # wall clock (epoch seconds) when the source read it

    def to_av(self, stream: av.stream.Stream, offset: int = 0) -> av.Packet[Any]:
        """A fresh PyAV packet for muxing into ``stream``, shifted back by ``offset``."""
        packet = av.Packet(self.data)
        packet.dts = self.dts - offset
        packet.pts = (self.pts - offset) if self.pts is not None else packet.dts
        packet.time_base = self.time_base
        packet.is_keyframe = self.is_keyframe
        packet.stream = stream
        return packet

    @property
    def seconds(self) -> float:
        # Not float(dts * time_base): Fraction arithmetic costs microseconds, per packet per task.
        return self.dts * self.time_base.numerator / self.time_base.denominator


class StreamTemplate:
    """Codec parameters of one source connection, detached from the demuxing container.

    Output containers are created with ``add_stream_from_template(template.stream)``; the template
    lives in a container of its own that is never written, so task threads never touch the
    container the source thread is reading.
    """

    def __init__(self, source_stream: av.stream.Stream, generation: int) -> None:
        self.generation = generation
        self._holder: av.container.OutputContainer = av.open(io.BytesIO(), "w", format="matroska")
        self.stream = self._holder.add_stream_from_template(source_stream)
        context = source_stream.codec_context
        self.codec = context.name if context is not None else "unknown"
        self.width = int(getattr(context, "width", 0) or 0)
        self.height = int(getattr(context, "height", 0) or 0)

    @classmethod
    def from_bitstream(
        cls, codec: str, keyframe: bytes, time_base: Fraction, generation: int
    ) -> StreamTemplate:
        """A template from a camera's own bitstream rather than a demuxed stream (the RTSP reader):
        ``keyframe`` is an access unit in Annex B with the parameter sets in front. FFmpeg's reader
        of raw H.264/H.265 takes the codec parameters from it, as its RTSP reader does from the
        SDP: extradata in Annex B, the picture size. Once per connection, never per packet."""
        with av.open(io.BytesIO(keyframe), "r", format=RAW_FORMATS[codec]) as probe:
            if not probe.streams.video:
                raise ValueError(f"the camera's {codec} stream has no usable keyframe")
            stream = probe.streams.video[0]
            stream.time_base = time_base
            return cls(stream, generation)

    def close(self) -> None:
        self._holder.close()


@dataclass(frozen=True, slots=True)
class CapturedFrame:
    """A decoded frame (or an already encoded image) and when it was captured (UTC)."""

    captured_at: datetime
    frame: av.video.frame.VideoFrame | None = None
    image: bytes | None = None
    image_format: str | None = None
