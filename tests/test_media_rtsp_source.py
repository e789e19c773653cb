"""The agent's own RTSP reader as a media source: a real gst-rtsp-server camera, PyAV and ffprobe
as independent readers of what it hands the tasks."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import av
import pytest

from tests.support.camera import RtspCamera
from tests.test_media_source import FrameCounter, Recorder
from tunnel_agent.media.packets import MediaPacket
from tunnel_agent.media.rtsp_source import RtspCameraSource
from tunnel_agent.media.settings import MediaSettings
from tunnel_agent.media.tasks.base import FrameTask, PacketTask
from tunnel_agent.media.urls import parse_source

FPS = 15
FRAME_TICKS = 90000 // FPS


async def run_source(
    url: str,
    packet_tasks: list[PacketTask],
    frame_tasks: list[FrameTask],
    enough: Callable[[], bool],
    username: str | None = None,
    password: str | None = None,
) -> RtspCameraSource:
    address = parse_source(url, username, password)
    source = RtspCameraSource("cam", address, MediaSettings(), packet_tasks, frame_tasks)
    tasks = [*packet_tasks, *frame_tasks]
    for task in tasks:
        task.start()
    source.start()
    try:
        deadline = time.monotonic() + 30
        while not enough():
            assert time.monotonic() < deadline, f"source: {source.status()}"
            await asyncio.sleep(0.05)
    finally:
        await source.stop_async()
        for task in tasks:
            await asyncio.to_thread(task.stop)
    return source


def ffprobe_frames(path: Path) -> int:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0",
         "-show_entries", "stream=nb_read_frames", "-of", "json", str(path)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return int(json.loads(out.stdout)["streams"][0]["nb_read_frames"])


async def test_a_b_frame_camera_keeps_every_frame_with_a_dts_that_increases(
    tmp_path: Path,
) -> None:
    cam = RtspCamera(tmp_path / "cam", extra=["--bframes", "2", "--fps", str(FPS)])
    recorder, counter = Recorder(), FrameCounter(0)  # rate 0: every frame decoded
    try:
        source = await run_source(
            cam.url(), [recorder], [counter], lambda: len(recorder.packets) >= 6 * FPS
        )
    finally:
        cam.stop()
    packets = recorder.packets
    assert len(recorder.templates) == 1 and recorder.templates[0].codec == "h264"
    assert packets[0].is_keyframe
    pts = [p.pts for p in packets]
    assert any(b < a for a, b in itertools.pairwise(pts))  # B-frames: sent out of order
    dts = [p.dts for p in packets]
    assert dts == sorted(set(dts)), "DTS must strictly increase"
    assert all(p.pts is not None and p.pts >= p.dts for p in packets)
    assert source.counters["packets_dropped_bad_timestamps"] == 0
    # Every frame: in presentation order they are one frame apart, from the first to the last
    # but the few the camera had sent and not yet followed up (at most the reordering depth).
    shown = sorted(p for p in pts if p is not None)
    complete = shown[: len(shown) - 2]
    assert all(b - a == FRAME_TICKS for a, b in itertools.pairwise(complete))
    # Each packet decodes to a picture (PyAV), and a clip muxed from them holds them all (ffprobe).
    assert source.counters["frames_decoded"] >= len(packets) - 3
    assert ffprobe_frames(mux_clip(tmp_path / "clip.mkv", recorder)) == len(packets)


def mux_clip(path: Path, recorder: Recorder) -> Path:
    with av.open(str(path), "w", format="matroska") as output:
        stream = output.add_stream_from_template(recorder.templates[0].stream)
        first: MediaPacket = recorder.packets[0]
        for packet in recorder.packets:
            output.mux(packet.to_av(stream, first.dts))
    return path


@pytest.mark.parametrize("auth", ["basic", "digest"])
async def test_a_camera_with_credentials_is_read_and_the_password_never_logged(
    tmp_path: Path, auth: str, caplog: pytest.LogCaptureFixture
) -> None:
    password = f"{auth}-Pa55-w0rd"
    cam = RtspCamera(tmp_path / "cam", user="viewer", password=password, auth=auth)
    counter = FrameCounter(2)
    caplog.set_level(logging.INFO, logger="tunnel_agent")
    try:
        wrong = RtspCameraSource(
            "wrong",
            parse_source(cam.url(), "viewer", "not-it"),
            MediaSettings(),
            [],
            [FrameCounter(2)],
        )
        wrong.start()
        source = await run_source(
            cam.url(), [], [counter], lambda: len(counter.frames) >= 3, username="viewer",
            password=password,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while (refused := wrong.reason) is None:
            assert time.monotonic() < deadline, wrong.status()
            await asyncio.sleep(0.05)
        await wrong.stop_async()
    finally:
        cam.stop()
    assert counter.frames[0].frame is not None and counter.frames[0].frame.width == 640
    assert source.counters["watchdog_restarts"] == 0
    assert "refused the credentials" in refused
    logged = " ".join(f"{r.getMessage()} {getattr(r, 'fields', {})}" for r in caplog.records)
    assert "refused the credentials" in logged  # the fields are in this text
    assert password not in logged and "not-it" not in logged
