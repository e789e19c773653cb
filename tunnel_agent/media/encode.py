"""Still images from decoded frames, with FFmpeg's encoders (no image library needed)."""

from __future__ import annotations

from fractions import Fraction

import av
import av.video.frame
import av.video.reformatter

# format -> (FFmpeg encoder, pixel format it takes)
IMAGE_ENCODERS: dict[str, tuple[str, str]] = {
    "jpeg": ("mjpeg", "yuvj420p"),
    "png": ("png", "rgb24"),
    "bmp": ("bmp", "bgr24"),
    "tiff": ("tiff", "rgb24"),
}
IMAGE_FORMAT_ALIASES = {"jpg": "jpeg", "tif": "tiff"}
CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "bmp": "image/bmp", "tiff": "image/tiff"}


class ImageEncoder:
    """Encodes frames as one image format; one per thread.

    A decoded frame is shared by every snapshot task of a camera, so the pixel-format conversion
    must not use the frame's own reformatter (``frame.reformat``): two threads converting the same
    frame through it deadlock in libswscale. Each encoder has its own.
    """

    def __init__(self, image_format: str = "jpeg", quality: int = 4) -> None:
        self.image_format = IMAGE_FORMAT_ALIASES.get(image_format, image_format)
        self.encoder, self.pixel_format = IMAGE_ENCODERS[self.image_format]
        self.quality = quality  # FFmpeg's qscale for JPEG: 2 best, 31 worst
        self._reformatter = av.video.reformatter.VideoReformatter()

    def codec_for(self, width: int, height: int) -> av.VideoCodecContext:
        """A fresh encoder context for one image, on the calling thread alone.

        FFmpeg's default (one thread per core) gives mjpeg slice threads that each hold a copy of
        the encoder's buffers: at 1080p that is ~33 MiB against ~6 MiB on one thread, for an image
        that takes tens of milliseconds and is taken at most a few times a second.
        """
        codec = av.CodecContext.create(self.encoder, "w")
        assert isinstance(codec, av.VideoCodecContext)
        codec.thread_count = 1
        codec.width = width
        codec.height = height
        codec.pix_fmt = self.pixel_format
        codec.time_base = Fraction(1, 25)
        if self.image_format == "jpeg":
            codec.qmin = codec.qmax = self.quality
        return codec

    def encode(self, frame: av.video.frame.VideoFrame) -> bytes:
        codec = self.codec_for(frame.width, frame.height)
        still = self._reformatter.reformat(frame, format=self.pixel_format)
        packets = list(codec.encode(still)) + list(codec.encode(None))
        return b"".join(bytes(p) for p in packets)


def encode_image(frame: av.video.frame.VideoFrame, image_format: str = "jpeg") -> bytes:
    """One frame as a complete image file, for callers that own the frame."""
    return ImageEncoder(image_format).encode(frame)
