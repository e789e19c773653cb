"""``tunnel-agent snapshot``: one image from a configured camera, for a quick check on site."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import av
import av.video.frame

from tunnel_agent.config.settings import CameraSettings
from tunnel_agent.media.encode import IMAGE_ENCODERS, IMAGE_FORMAT_ALIASES, ImageEncoder
from tunnel_agent.media.files import write_atomically
from tunnel_agent.media.http_source import HttpImageFetcher
from tunnel_agent.media.settings import MediaSettings
from tunnel_agent.media.urls import SourceAddress, SourceKind, parse_source, rtsp_input_options


class SnapshotFailed(Exception):
    """Why no image could be taken (credentials are never part of the message)."""


def format_for(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    image_format = IMAGE_FORMAT_ALIASES.get(suffix, suffix)
    if image_format not in IMAGE_ENCODERS:
        raise SnapshotFailed(
            f"cannot tell the image format from {path.name!r}: use .jpg, .png, .bmp or .tiff"
        )
    return image_format


def take_snapshot(camera: CameraSettings, media: MediaSettings, output: Path) -> tuple[int, int]:
    """Write one image of ``camera`` to ``output``; return its (width, height)."""
    if not camera.url:
        raise SnapshotFailed(f"camera {camera.name!r} has no url")
    image_format = format_for(output)
    password = camera.password.get_secret_value() if camera.password else None
    address = parse_source(camera.url, camera.username, password)
    if address.kind is SourceKind.HTTP_SNAPSHOT:
        frame = asyncio.run(_http_frame(address, media.open_timeout))
    else:
        frame = _first_frame(address, camera, media)
    write_atomically(output, ImageEncoder(image_format).encode(frame))
    return frame.width, frame.height


async def _http_frame(address: SourceAddress, timeout_s: float) -> av.video.frame.VideoFrame:
    async with HttpImageFetcher(
        address.open_url, address.username, address.password, timeout_s
    ) as fetcher:
        data, _ = await fetcher.fetch()
    with av.open(io.BytesIO(data), "r") as container:
        return next(container.decode(video=0))


def _first_frame(
    address: SourceAddress, camera: CameraSettings, media: MediaSettings
) -> av.video.frame.VideoFrame:
    options = (
        rtsp_input_options(address.open_url, camera.ca_file, media.watchdog)
        if address.kind is SourceKind.RTSP
        else {}
    )
    container_format = "v4l2" if address.kind is SourceKind.V4L2 else None
    with av.open(
        address.open_url,
        "r",
        format=container_format,
        options=options,
        timeout=(media.open_timeout, media.watchdog),
    ) as container:
        for frame in container.decode(video=0):
            return frame
    raise SnapshotFailed("the source ended before a frame was decoded")
