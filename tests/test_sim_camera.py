"""The test camera itself: a shared live stream that many viewers may join and leave at once."""

from __future__ import annotations

import itertools
from pathlib import Path

from tests.support.camera import RtspCamera
from tests.support.rtsp_storm import player, storm


async def test_a_viewer_joining_does_not_restart_the_stream_of_the_others(tmp_path: Path) -> None:
    cam = RtspCamera(tmp_path / "cam")
    try:
        first = await player(cam)
        await first.read_media(1.0)
        second = await player(cam)
        await first.read_media(1.0)
        await second.read_media(0.5)
    finally:
        cam.stop()
    stamps = first.rtp_timestamps
    assert len(stamps) > 20 and second.rtp_timestamps
    steps = [ahead(a, b) for a, b in itertools.pairwise(stamps)]
    assert all(step < 2**31 for step in steps), "the first viewer's clock went back"
    assert sum(steps) > 90_000  # more than 1 s of the 90 kHz clock, without a reset
    assert 0 < ahead(stamps[0], second.rtp_timestamps[0]) < 2**31


def ahead(earlier: int, later: int) -> int:
    """How far the 32-bit RTP clock moved from ``earlier`` to ``later`` (it wraps)."""
    return (later - earlier) % 2**32


async def test_the_camera_survives_viewers_that_join_and_leave_at_once(tmp_path: Path) -> None:
    """Ten clients at a time, each leaving after DESCRIBE, after SETUP, with its PLAY unanswered,
    while playing, or with a TEARDOWN, round after round."""
    cam = RtspCamera(tmp_path / "cam")
    try:
        tally = await storm(cam, clients=10, seconds=8, seed=7, burst=True)
        assert cam.process.process.poll() is None, cam.process.output()[-2000:]
    finally:
        cam.stop()
    assert tally.scripts["play"] + tally.scripts["teardown"] >= 10
    assert set(tally.statuses) == {"ok"}, tally.statuses
    assert tally.rtp_bytes > 1_000_000
