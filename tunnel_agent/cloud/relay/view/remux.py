"""RTSP in, fragmented MP4 out, without transcoding, on the relay's event loop.

``tunnel_agent.rtsp`` reads the camera over RTSP with interleaved TCP (the only transport a byte
tunnel carries) and depacketises RTP into access units; ``Remuxer`` turns those into the init
segment and fragments (``fmp4``). Nothing runs in a thread: the camera's bytes arrive in large
chunks in the client's ``data_received`` and cost a few microseconds of Python per RTP packet,
where FFmpeg's RTSP demuxer, in a thread of its own, polled and read three times per packet.

The first fragment starts at the first keyframe, and a fragment is cut at every keyframe and
every ``FRAGMENT_DURATION_S``, so frames leave the relay within a tenth of a second instead of at
the end of their group of pictures. A fragment per frame would cut that to one frame but costs a
WebSocket message and a TLS record per frame and viewer; a tenth of a second keeps the latency
well under the 1.5 s target at a third of that cost at 25 fps. H.264 and H.265 video and AAC
audio (when the camera sends it) are copied as they are.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from tunnel_agent import __version__
from tunnel_agent.cloud.relay.view import fmp4
from tunnel_agent.cloud.relay.view.boxes import describe_init
from tunnel_agent.cloud.relay.view.segments import (
    CameraStreamError,
    Fragment,
    InitSegment,
    Keyframe,
)
from tunnel_agent.rtsp.client import RtspClient
from tunnel_agent.rtsp.codec_info import aac_config, h264_picture, h265_picture
from tunnel_agent.rtsp.depacketize import (
    AacDepacketizer,
    AudioAccessUnit,
    H264Depacketizer,
    H265Depacketizer,
    VideoAccessUnit,
)
from tunnel_agent.rtsp.errors import RtspError
from tunnel_agent.rtsp.sdp import MediaDescription, SessionDescription

PLAYABLE_VIDEO = {"H264": "h264", "H265": "hevc"}  # RTP encoding name: FFmpeg's codec name
FRAGMENT_DURATION_S = 0.1


class RemuxSink(Protocol):
    """Where the results go (the watch, on the same event loop)."""

    def on_init(self, init: InitSegment) -> None: ...

    def on_fragment(self, fragment: Fragment) -> None: ...

    def on_keyframe(self, keyframe: Keyframe) -> None: ...


@dataclass(frozen=True)
class AudioSetup:
    """AAC as the SDP describes it: the RTP clock and the AudioSpecificConfig."""

    clock_rate: int
    audio_specific_config: bytes
    channels: int


async def remux(
    connect: Callable[[asyncio.Protocol], None],
    url: str,
    sink: RemuxSink,
    generation: int,
    *,
    username: str | None = None,
    password: str | None = None,
    open_timeout_s: float,
    read_timeout_s: float,
) -> None:
    """Read the camera at ``url`` until its stream ends or fails, and raise why (``RtspError``).

    ``connect`` joins the RTSP client to the way to the camera (the relay's tunnel)."""
    client = RtspClient(
        url,
        username=username,
        password=password,
        request_timeout_s=open_timeout_s,
        read_timeout_s=read_timeout_s,
        user_agent=f"tunnel-agent-relay/{__version__}",
    )
    try:
        client.prepare()
        connect(client)
        description = await client.describe()
        video = pick_video(description)
        audio = pick_audio(description)
        remuxer = Remuxer(
            PLAYABLE_VIDEO[video.encoding],
            video.clock_rate or 90000,
            _audio_setup(audio) if audio is not None else None,
            sink,
            generation,
        )
        if video.encoding == "H264":
            depacketizer: H264Depacketizer | H265Depacketizer = H264Depacketizer.from_sdp(
                video, remuxer.on_video
            )
        else:
            depacketizer = H265Depacketizer.from_sdp(video, remuxer.on_video)
        remuxer.parameter_sets = depacketizer.parameter_sets
        await client.setup(video, depacketizer)
        if audio is not None:
            await client.setup(audio, AacDepacketizer.from_sdp(audio, remuxer.on_audio))
        await client.play()
        await client.wait()
    finally:
        await client.close()


def pick_video(description: SessionDescription) -> MediaDescription:
    videos = [m for m in description.media if m.kind == "video"]
    if not videos:
        raise CameraStreamError("the camera's stream has no video")
    playable = [m for m in videos if m.encoding in PLAYABLE_VIDEO]
    if not playable:
        name = videos[0].encoding or "unknown"
        raise CameraStreamError(f"the camera sends {name} video; browsers play H.264 or H.265")
    return playable[0]


def pick_audio(description: SessionDescription) -> MediaDescription | None:
    """AAC in ``mpeg4-generic`` with its configuration, if the camera sends it (else no audio)."""
    for media in description.media:
        fmtp = media.fmtp
        if (
            media.kind == "audio"
            and media.encoding == "MPEG4-GENERIC"
            and fmtp.get("mode", "").lower() in ("aac-hbr", "aac-lbr")
            and fmtp.get("config")
            and media.clock_rate > 0
        ):
            return media
    return None


def _audio_setup(media: MediaDescription) -> AudioSetup:
    try:
        config = bytes.fromhex(media.fmtp["config"])
        channels = aac_config(config).channels or media.channels or 1
    except (ValueError, RtspError):
        raise CameraStreamError("the camera's AAC configuration is not usable") from None
    return AudioSetup(media.clock_rate, config, channels)


class Remuxer:
    """Access units of one camera connection to init segment, fragments and keyframes.

    ``parameter_sets`` is the depacketiser's own table (the SDP's, updated in-band), read when the
    first keyframe arrives to write the sample entry and learn the picture size."""

    def __init__(
        self,
        codec: str,
        clock_rate: int,
        audio: AudioSetup | None,
        sink: RemuxSink,
        generation: int,
    ) -> None:
        self.codec = codec
        self.clock_rate = clock_rate
        self.audio = audio
        self.sink = sink
        self.generation = generation
        self.parameter_sets: dict[int, bytes] = {}
        self.fragmenter: fmp4.Fragmenter | None = None
        self.config = b""
        self.video_origin = 0
        self.audio_origin = 0
        self.last_decode_time = -1
        self.keyframes = 0

    def on_video(self, unit: VideoAccessUnit) -> None:
        data = fmp4.length_prefixed(unit.units)
        if self.fragmenter is None:
            if not unit.keyframe:
                return  # a viewer's decoder can start only at a keyframe
            self._start(unit.timestamp)
        assert self.fragmenter is not None
        if unit.keyframe:
            self.keyframes += 1
            self.sink.on_keyframe(
                Keyframe(self.codec, self.config, data, self.generation, self.keyframes)
            )
        decode_time = unit.timestamp - self.video_origin
        if decode_time <= self.last_decode_time:
            return  # RTP carries presentation times; one that goes back has no decode slot
        self.last_decode_time = decode_time
        done = self.fragmenter.add_video(fmp4.Sample(data, decode_time, 0, unit.keyframe))
        if done is not None:
            fragment, keyframe = done
            self.sink.on_fragment(Fragment(fragment, keyframe, self.generation, time.monotonic()))

    def on_audio(self, unit: AudioAccessUnit) -> None:
        if self.fragmenter is None or self.fragmenter.audio is None:
            return
        decode_time = unit.timestamp - self.audio_origin
        if decode_time >= 0:  # audio from before the first keyframe has no picture to go with
            self.fragmenter.add_audio(fmp4.Sample(unit.data, decode_time, 0, True))

    def flush(self) -> None:
        if self.fragmenter is not None and (done := self.fragmenter.flush()) is not None:
            fragment, keyframe = done
            self.sink.on_fragment(Fragment(fragment, keyframe, self.generation, time.monotonic()))

    def _start(self, timestamp: int) -> None:
        """The init segment, from the parameter sets current at the first keyframe."""
        try:
            video = self._video_track()
        except (fmp4.UnusableStream, RtspError) as exc:
            raise CameraStreamError(str(exc)) from None
        self.config = video.config
        audio = None
        if self.audio is not None:
            asc = self.audio.audio_specific_config
            sample_rate = aac_config(asc).sample_rate
            audio = fmp4.AudioTrack(sample_rate, self.audio.channels, self.audio.clock_rate, asc)
        self.fragmenter = fmp4.Fragmenter(video, audio, FRAGMENT_DURATION_S)
        self.video_origin = timestamp
        if self.audio is not None:
            # Both clocks count from the same instant (RTP-Info), so this is the same moment.
            self.audio_origin = timestamp * self.audio.clock_rate // self.clock_rate
        tracks: list[fmp4.Track] = [video] + ([audio] if audio is not None else [])
        data = fmp4.init_segment(tracks)
        moov = data[int.from_bytes(data[:4], "big") :]
        self.sink.on_init(InitSegment(data, describe_init(moov), self.generation, self.codec))

    def _video_track(self) -> fmp4.VideoTrack:
        sets = self.parameter_sets
        if self.codec == "h264":
            sps, pps = sets.get(fmp4.H264_SPS), sets.get(fmp4.H264_PPS)
            if sps is None or pps is None:
                raise fmp4.UnusableStream("the camera's H.264 stream carries no SPS/PPS")
            picture = h264_picture(sps)
            config = fmp4.avcc([sps], [pps])
        else:
            vps, sps, pps = (sets.get(k) for k in (fmp4.HEVC_VPS, fmp4.HEVC_SPS, fmp4.HEVC_PPS))
            if vps is None or sps is None or pps is None:
                raise fmp4.UnusableStream("the camera's H.265 stream carries no VPS/SPS/PPS")
            picture = h265_picture(sps)
            config = fmp4.hvcc([vps], [sps], [pps], picture.chroma_format, picture.bit_depth)
        return fmp4.VideoTrack(self.codec, picture.width, picture.height, self.clock_rate, config)
