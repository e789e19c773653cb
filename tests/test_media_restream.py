"""stream-to-rtsp(s) in the agent's own process: the stream arrives decodable at gst-rtsp-server's
RECORD mount (GStreamer depacketises and decodes it: an independent client), H.264 from a camera
(Annex B) and from an MP4 file (length-prefixed NAL units), H.265 with Digest auth; and a server
that reads too slowly gets whole groups of pictures from a bounded queue while the loop runs on."""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import subprocess
import threading
import time
from fractions import Fraction
from pathlib import Path

import av
import pytest

from tests.conftest import camera_entry
from tests.support.camera import RtspCamera
from tests.test_media import media_agent
from tests.test_rtsp_publisher import read_request
from tunnel_agent.media.backoff import Backoff
from tunnel_agent.media.packets import MediaPacket, StreamTemplate
from tunnel_agent.media.settings import StreamSettings
from tunnel_agent.media.tasks.restream import StreamToRtsp
from tunnel_agent.rtsp.depacketize import H264Depacketizer, VideoAccessUnit
from tunnel_agent.rtsp.messages import Framer

FRAMES_WANTED = 45  # 3 s of the test camera, decoded by the RECORD mount
KIB = 1024


def noisy_h264_mp4(path: Path, seconds: int) -> Path:
    """640x360 25 fps H.264 with a keyframe every second, about 3 Mbit/s (noise resists
    compression), in MP4: its packets carry length-prefixed NAL units, its extradata is avcC."""
    subprocess.run(
        [
            "ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc2=size=640x360:rate=25",
            "-vf", "noise=alls=6:allf=t", "-t", str(seconds), "-c:v", "libx264",
            "-preset", "ultrafast", "-g", "25", "-pix_fmt", "yuv420p", str(path),
        ],
        check=True,
        timeout=60,
    )  # fmt: skip
    return path


def record_to(server: RtspCamera, **extra: object) -> dict[str, object]:
    return {
        "name": "out",
        "task": "stream-to-rtsp",
        "media_server_address": "127.0.0.1",
        "media_server_port": server.port,
        "media_server_path": "rec",
        **extra,
    }


@pytest.mark.timeout(90)
async def test_h265_is_published_with_digest_auth_and_decoded_by_the_server(
    tmp_path: Path,
) -> None:
    camera = RtspCamera(tmp_path / "camera", extra=["--codec", "h265"])
    server = RtspCamera(
        tmp_path / "server", record_path="/rec", user="pub", password="Dig3st-Pass", auth="digest"
    )
    try:
        stream = record_to(server, media_server_username="pub", media_server_password="Dig3st-Pass")
        agent = media_agent(tmp_path / "agent", [camera_entry(camera, streams=[stream])])
        try:
            server.process.wait_for(lambda _: server.recorded_frames() > FRAMES_WANTED, 45)
        finally:
            agent.stop()
    finally:
        camera.stop()
        server.stop()
    (connected, *_) = agent.events("media.restream_connected")
    assert connected["codec"] == "h265"
    assert "Dig3st-Pass" not in agent.output()


@pytest.mark.timeout(90)
async def test_h264_from_an_mp4_file_is_published_and_decoded_by_the_server(
    tmp_path: Path,
) -> None:
    video = noisy_h264_mp4(tmp_path / "loop.mp4", 4)
    server = RtspCamera(tmp_path / "server", record_path="/rec")
    cameras = [{"name": "file", "url": f"file://{video}", "streams": [record_to(server)]}]
    agent = media_agent(tmp_path / "agent", cameras)
    try:
        # More frames than the file holds: the loops follow each other decodably too.
        server.process.wait_for(lambda _: server.recorded_frames() > 4 * 25 + 25, 60)
    finally:
        agent.stop()
        server.stop()
    (connected, *_) = agent.events("media.restream_connected")
    assert connected["codec"] == "h264"


class SlowMediaServer:
    """A RECORD server on the test's loop that reads ``read_bytes_per_s`` after RECORD and keeps
    every RTP packet it read; its small receive buffer makes the sender's queue fill soon."""

    def __init__(self, read_bytes_per_s: int) -> None:
        self.read_bytes_per_s = read_bytes_per_s
        self.packets: list[bytes] = []
        self.recording = asyncio.Event()
        self._framer = Framer(
            lambda _channel, packet: self.packets.append(bytes(packet)), lambda _answer: None
        )

    async def start(self) -> int:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited by each session
        sock.bind(("127.0.0.1", 0))
        self._server = await asyncio.start_server(self._session, sock=sock, limit=4 * KIB)
        return int(sock.getsockname()[1])

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while not self.recording.is_set():
                method, headers, _ = await read_request(reader)
                transport = "Transport: RTP/AVP/TCP;unicast;interleaved=0-1;mode=record\r\n"
                writer.write(
                    f"RTSP/1.0 200 OK\r\nCSeq: {headers['cseq']}\r\nSession: 77\r\n"
                    f"{transport if method == 'SETUP' else ''}\r\n".encode()
                )
                if method == "RECORD":
                    self.recording.set()
            while chunk := await reader.read(4 * KIB):
                self._framer.feed(chunk)
                await asyncio.sleep(len(chunk) / self.read_bytes_per_s)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        self._server.close()


def feed_in_real_time(task: StreamToRtsp, video: Path, stop: threading.Event) -> float:
    """Demux ``video`` and hand it to ``task`` as a camera source would, paced by its
    timestamps; returns the stream's bytes per second."""
    total_bytes, started = 0, time.monotonic()
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        time_base = stream.time_base
        assert time_base is not None
        template = StreamTemplate(stream, 1)
        task.on_stream(template)
        for packet in container.demux(stream):
            if packet.size == 0 or packet.dts is None or stop.is_set():
                continue
            seconds = float(packet.dts * time_base)
            delay = started + seconds - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            total_bytes += packet.size
            task.on_packet(
                MediaPacket(
                    bytes(packet),
                    packet.pts,
                    packet.dts,
                    Fraction(time_base),
                    packet.is_keyframe,
                    1,
                    time.time(),
                )
            )
        task.flush()
        return total_bytes / max(seconds, 1.0)


@pytest.mark.timeout(90)
async def test_a_slow_server_gets_whole_groups_of_pictures_from_a_bounded_queue(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "tunnel_agent.media")
    video = noisy_h264_mp4(tmp_path / "noisy.mp4", 10)
    server = SlowMediaServer(read_bytes_per_s=60 * KIB)
    port = await server.start()
    settings = StreamSettings(
        name="out",
        task="stream-to-rtsp",
        media_server_address="127.0.0.1",
        media_server_port=port,
        media_server_path="slow",
    )
    task = StreamToRtsp("cam", settings, Backoff(), open_timeout_s=5.0, write_timeout_s=10.0)
    task.max_queued_bytes = 64 * KIB
    task.start()
    queued: list[int] = []
    lags_s: list[float] = []
    stop = threading.Event()
    feeding = asyncio.ensure_future(asyncio.to_thread(feed_in_real_time, task, video, stop))
    try:
        while not feeding.done():  # the loop keeps its rhythm while the server holds back
            before = time.monotonic()
            await asyncio.sleep(0.05)
            lags_s.append(time.monotonic() - before - 0.05)
            publisher = task._publisher
            if publisher is not None and publisher._transport is not None:
                queued.append(publisher._transport.get_write_buffer_size())
        stream_bytes_per_s = await feeding
    finally:
        stop.set()
        await asyncio.to_thread(task.stop)
        server.close()

    assert stream_bytes_per_s > 3 * server.read_bytes_per_s  # the server cannot keep up
    assert task.counters["failures"] == 0 and task.counters["connects"] == 1
    assert task.counters["gops_dropped_slow_server"] >= 2
    assert task.counters["packets_dropped_slow_server"] > 0
    assert max(queued) <= task.max_queued_bytes + 256 * KIB  # the limit and one batch at most
    assert max(lags_s) < 0.5, max(lags_s)
    behind = [r for r in caplog.records if r.getMessage() == "media.restream_behind"]
    assert len(behind) == 1  # logged once, counted every time

    # What the server read decodes: after every gap the stream starts again at a keyframe.
    units: list[VideoAccessUnit] = []
    depacketizer = H264Depacketizer(units.append)
    for packet in server.packets:
        depacketizer.push(packet)
    assert len(units) > 25
    frame_ticks = 90_000 // 25
    restarts = [
        later
        for earlier, later in itertools.pairwise(units)
        if later.timestamp - earlier.timestamp > frame_ticks * 3 // 2
    ]
    assert restarts and all(unit.keyframe for unit in restarts)
    assert units[0].keyframe and depacketizer.frames_dropped == 0
