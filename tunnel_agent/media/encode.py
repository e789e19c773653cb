"""Still images from decoded frames, with FFmpeg's encoders (no image library needed)."""

from __future__ import annotations

from fractions import Fraction

import av
import av.video.frame

# format -> (FFmpeg encoder, pixel format it takes)
IMAGE_ENCODERS: dict[str, tuple[str, str]] = {
    "jpeg": ("mjpeg", "yuvj420p"),
    "png": ("png", "rgb24"),
    "bmp": ("bmp", "bgr24"),
    "tiff": ("tiff", "rgb24"),
}
IMAGE_FORMAT_ALIASES = {"jpg": "jpeg", "tif": "tiff"}
CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "bmp": "image/bmp", "tiff": "image/tiff"}


def encode_image(
    frame: av.video.frame.VideoFrame, image_format: str = "jpeg", quality: int = 4
) -> bytes:
    """One frame as a complete image file; ``quality`` is FFmpeg's qscale (2 best, 31 worst)."""
    image_format = IMAGE_FORMAT_ALIASES.get(image_format, image_format)
    encoder, pixel_format = IMAGE_ENCODERS[image_format]
    codec = av.CodecContext.create(encoder, "w")
    assert isinstance(codec, av.VideoCodecContext)
    codec.width = frame.width
    codec.height = frame.height
    codec.pix_fmt = pixel_format
    codec.time_base = Fraction(1, 25)
    if image_format == "jpeg":
        codec.qmin = codec.qmax = quality
    still = frame.reformat(format=pixel_format)
    packets = list(codec.encode(still)) + list(codec.encode(None))
    return b"".join(bytes(p) for p in packets)
