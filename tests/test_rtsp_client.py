"""``tunnel_agent.rtsp`` against the real test camera (gst-rtsp-server): H.264, H.265, AAC, Basic
and Digest authentication, errors, keep-alive and TEARDOWN, and frames that decode with FFmpeg."""

from __future__ import annotations

import asyncio
import itertools
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import av
import pytest

from tests.support.camera import RtspCamera
from tunnel_agent.rtsp.client import RtspClient
from tunnel_agent.rtsp.codec_info import h264_picture, h265_picture
from tunnel_agent.rtsp.depacketize import (
    AacDepacketizer,
    AudioAccessUnit,
    H264Depacketizer,
    H265Depacketizer,
    VideoAccessUnit,
)
from tunnel_agent.rtsp.errors import RtspAuthFailed, RtspNotFound, RtspTimeout

CAMERA_FPS = 15  # tunnel_agent/sim/rtsp_camera.py's defaults
CAMERA_GOP = 15
CAMERA_SIZE = (640, 360)
VIDEO_CLOCK = 90000
PASSWORD = "cam-Pa55-word"
SESSION = re.compile(rb"Session: ([^;\r]+)\r\n")


@pytest.fixture(scope="module")
def media_cameras(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RtspCamera]]:
    folder = tmp_path_factory.mktemp("rtsp-client")
    cameras = {
        "audio": RtspCamera(folder / "audio", extra=["--audio"]),
        "hevc": RtspCamera(folder / "hevc", extra=["--codec", "h265"]),
    }
    yield cameras
    for camera in cameras.values():
        camera.stop()


@dataclass
class Reading:
    client: RtspClient
    video: list[VideoAccessUnit] = field(default_factory=list)
    audio: list[AudioAccessUnit] = field(default_factory=list)
    depacketizer: H264Depacketizer | H265Depacketizer | None = None

    def keyframes(self) -> int:
        return sum(u.keyframe for u in self.video)


async def read(
    camera: RtspCamera,
    *,
    until: Callable[[Reading], bool],
    username: str | None = None,
    password: str | None = None,
    path: str | None = None,
    port: int | None = None,
    deadline_s: float = 20.0,
) -> Reading:
    port = port or camera.port
    url = f"rtsp://{camera.host}:{port}{path or camera.path}"
    client = RtspClient(url, username=username, password=password, request_timeout_s=5)
    reading = Reading(client)
    try:
        await client.connect(camera.host, port)
        description = await client.describe()
        for media in description.media:
            if media.encoding == "H264":
                reading.depacketizer = H264Depacketizer.from_sdp(media, reading.video.append)
            elif media.encoding == "H265":
                reading.depacketizer = H265Depacketizer.from_sdp(media, reading.video.append)
            elif media.encoding == "MPEG4-GENERIC":
                await client.setup(media, AacDepacketizer.from_sdp(media, reading.audio.append))
                continue
            else:
                continue
            await client.setup(media, reading.depacketizer)
        await client.play()
        async with asyncio.timeout(deadline_s):
            while not until(reading):
                await asyncio.sleep(0.05)
    finally:
        await client.close()
    return reading


def decoded_sizes(codec: str, units: list[VideoAccessUnit]) -> list[tuple[int, int]]:
    """What FFmpeg decodes from the access units (Annex B): proof that they are whole."""
    decoder = av.CodecContext.create(codec, "r")
    frames = []
    for unit in units:
        data = b"".join(b"\x00\x00\x00\x01" + n for n in unit.units)
        frames += decoder.decode(av.Packet(data))
    frames += decoder.decode(None)
    return [(f.width, f.height) for f in frames if isinstance(f, av.VideoFrame)]


async def test_h264_frames_keyframes_and_timestamps_from_the_camera(camera: RtspCamera) -> None:
    reading = await read(camera, until=lambda r: r.keyframes() >= 3 and len(r.video) >= 35)

    video = reading.video
    first_key = next(i for i, u in enumerate(video) if u.keyframe)
    keys = [i for i, u in enumerate(video) if u.keyframe]
    assert all(b - a == CAMERA_GOP for a, b in itertools.pairwise(keys))
    steps = [b.timestamp - a.timestamp for a, b in itertools.pairwise(video)]
    assert all(step > 0 for step in steps)
    mean_step = sum(steps) / len(steps)
    assert abs(mean_step - VIDEO_CLOCK / CAMERA_FPS) < 0.1 * VIDEO_CLOCK / CAMERA_FPS
    assert reading.depacketizer is not None and reading.depacketizer.frames_dropped == 0
    picture = h264_picture(reading.depacketizer.parameter_sets[7])
    assert (picture.width, picture.height) == CAMERA_SIZE
    sizes = decoded_sizes("h264", video[first_key:])
    assert len(sizes) == len(video) - first_key and set(sizes) == {CAMERA_SIZE}


async def test_h265_frames_from_the_camera(media_cameras: dict[str, RtspCamera]) -> None:
    reading = await read(media_cameras["hevc"], until=lambda r: r.keyframes() >= 2)

    assert reading.depacketizer is not None
    picture = h265_picture(reading.depacketizer.parameter_sets[33])
    assert (picture.width, picture.height) == CAMERA_SIZE
    first_key = next(i for i, u in enumerate(reading.video) if u.keyframe)
    assert set(decoded_sizes("hevc", reading.video[first_key:])) == {CAMERA_SIZE}


async def test_aac_frames_beside_the_video_on_one_clock(
    media_cameras: dict[str, RtspCamera],
) -> None:
    reading = await read(
        media_cameras["audio"], until=lambda r: len(r.audio) >= 100 and r.keyframes() >= 1
    )

    audio = reading.audio
    assert [b.timestamp - a.timestamp for a, b in itertools.pairwise(audio)] == [1024] * (
        len(audio) - 1
    )
    # RTP-Info puts both clocks on the same instant: the first audio and video are close.
    assert abs(audio[0].timestamp / 48000 - reading.video[0].timestamp / VIDEO_CLOCK) < 0.5
    decoder = av.CodecContext.create("aac", "r")
    decoder.extradata = bytes.fromhex("1188")
    samples = sum(f.samples for u in audio[:20] for f in decoder.decode(av.Packet(u.data)))
    assert samples >= 19 * 1024


async def test_a_digest_camera_with_the_right_and_wrong_credentials(
    digest_camera: RtspCamera,
) -> None:
    reading = await read(
        digest_camera, username="viewer", password=PASSWORD, until=lambda r: r.keyframes() >= 1
    )
    assert reading.video

    with pytest.raises(RtspAuthFailed) as refused:
        await read(digest_camera, username="viewer", password="not-it-9", until=lambda r: True)
    assert str(refused.value) == "the camera refused the credentials"
    assert "not-it-9" not in repr(refused.value)
    with pytest.raises(RtspAuthFailed, match="none were given"):
        await read(digest_camera, until=lambda r: True)


async def test_a_basic_camera(auth_camera: RtspCamera) -> None:
    reading = await read(
        auth_camera, username="viewer", password=PASSWORD, until=lambda r: r.keyframes() >= 1
    )
    assert reading.video


async def test_a_wrong_path_is_named(camera: RtspCamera) -> None:
    with pytest.raises(RtspNotFound, match="no stream at this path"):
        await read(camera, path="/no-such-stream", until=lambda r: True)


async def test_a_camera_that_never_answers_fails_within_the_deadline() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client = RtspClient(f"rtsp://127.0.0.1:{port}/silent", request_timeout_s=1.0)
        started = time.monotonic()
        await client.connect("127.0.0.1", port)
        with pytest.raises(RtspTimeout, match="did not answer OPTIONS in time"):
            await client.describe()
        await client.close()
        assert time.monotonic() - started < 3.0


class RecordingProxy:
    """Between client and camera: records what the client sends, and announces a short session
    timeout in the camera's name (it says none: 60 s), so that keep-alives come within the test."""

    def __init__(self, camera: RtspCamera, timeout_s: int) -> None:
        self.camera = camera
        self.timeout_s = timeout_s
        self.sent = bytearray()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.camera.host, self.camera.port)

        async def upstream() -> None:
            while data := await reader.read(65536):
                self.sent += data
                up_writer.write(data)
            up_writer.close()

        async def downstream() -> None:
            while data := await up_reader.read(65536):
                writer.write(SESSION.sub(rb"Session: \1;timeout=%d\r\n" % self.timeout_s, data))
            writer.close()

        await asyncio.gather(upstream(), downstream(), return_exceptions=True)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()


async def test_keep_alive_within_the_session_timeout_and_teardown_on_close(
    camera: RtspCamera,
) -> None:
    proxy = RecordingProxy(camera, timeout_s=2)
    port = await proxy.start()
    try:
        reading = await read(
            camera, port=port, until=lambda r: proxy.sent.count(b"GET_PARAMETER ") >= 2
        )
        assert reading.client.playing and reading.video
        async with asyncio.timeout(5):
            while b"TEARDOWN " not in proxy.sent:
                await asyncio.sleep(0.05)
    finally:
        await proxy.stop()
    assert b"Session: " in proxy.sent.split(b"GET_PARAMETER ")[1]


def test_the_package_does_not_need_the_relay() -> None:
    package = Path(__file__).resolve().parents[1] / "tunnel_agent" / "rtsp"
    sources = "\n".join(p.read_text() for p in package.glob("*.py"))
    assert "tunnel_agent.cloud" not in sources and "import av" not in sources
