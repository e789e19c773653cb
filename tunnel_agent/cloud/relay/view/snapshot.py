"""Still images for ``snapshot.jpg``: the latest keyframe, decoded on request, never other frames.

Decoding only keyframes, and only when someone asks, keeps a watched session's cost at remuxing
(no decoder runs while nobody wants a picture). A keyframe decodes alone, given the codec's
parameter sets (the stream's extradata; H.264 cameras usually repeat them in-band as well).
"""

from __future__ import annotations

import av
import av.error

from tunnel_agent.cloud.relay.view.segments import Keyframe, SnapshotFailed
from tunnel_agent.media.encode import ImageEncoder

JPEG_QUALITY = 3  # FFmpeg qscale: 2 best, 31 worst


def keyframe_to_jpeg(keyframe: Keyframe) -> tuple[bytes, int, int]:
    """(JPEG bytes, width, height); runs in a worker thread (decoding is CPU work)."""
    decoder = av.CodecContext.create(keyframe.codec, "r")
    assert isinstance(decoder, av.VideoCodecContext)
    if keyframe.extradata:
        decoder.extradata = keyframe.extradata
    try:
        frames = list(decoder.decode(av.Packet(keyframe.data)))
        frames += list(decoder.decode(None))
    except av.error.FFmpegError as exc:
        raise SnapshotFailed(f"the keyframe could not be decoded ({type(exc).__name__})") from None
    video = [f for f in frames if isinstance(f, av.VideoFrame)]
    if not video:
        raise SnapshotFailed("the keyframe decoded to no picture")
    frame = video[0]
    return ImageEncoder("jpeg", JPEG_QUALITY).encode(frame), frame.width, frame.height
