"""Decoding timestamps from RTP's presentation times, and the reordering depth an SPS declares."""

from __future__ import annotations

from fractions import Fraction

import av
import pytest

from tunnel_agent.media.pacing import SnapshotPlan
from tunnel_agent.rtsp.codec_info import h264_reorder_frames, h265_reorder_frames
from tunnel_agent.rtsp.decode_order import DecodeOrder

# Presentation times (in frames) in the order an encoder with two B-frames sends them.
B_FRAMES = [0, 3, 1, 2, 6, 4, 5, 9, 7, 8, 12, 10, 11]
B_PYRAMID = [0, 4, 2, 1, 3, 8, 6, 5, 7, 12, 10, 9, 11]


@pytest.mark.parametrize(("order", "depth"), [(B_FRAMES, 1), (B_PYRAMID, 2), (list(range(9)), 0)])
def test_every_frame_gets_a_dts_that_increases_and_precedes_its_presentation(
    order: list[int], depth: int
) -> None:
    timeline = DecodeOrder(depth, frame_ticks=3600)
    pts = [p * 3600 for p in order]
    dts = [timeline.dts(p) for p in pts]
    assert None not in dts and timeline.refused == 0
    assert dts == sorted(set(dts))  # type: ignore[type-var]
    assert all(d <= p for d, p in zip(dts, pts, strict=True))  # type: ignore[operator]
    # Once the first `depth` frames are in, the DTS are the presentation times, `depth` late.
    assert dts[depth:] == sorted(pts)[: len(pts) - depth]


def test_a_stream_reordering_more_than_it_said_loses_only_the_frames_no_muxer_takes() -> None:
    timeline = DecodeOrder(0, frame_ticks=1)
    dts = [timeline.dts(p) for p in B_FRAMES]
    kept = [d for d in dts if d is not None]
    assert kept == sorted(set(kept)) and timeline.refused == len(dts) - len(kept) > 0
    assert all(
        d is None or d <= p for d, p in zip(dts, B_FRAMES, strict=True)
    )  # what went on is valid


def encoded_units(codec: str, options: dict[str, str]) -> list[bytes]:
    """The NAL units a PyAV encoder writes for eight frames (Annex B output)."""
    encoder = av.CodecContext.create(codec, "w")
    encoder.width, encoder.height, encoder.pix_fmt = 320, 240, "yuv420p"
    encoder.time_base = Fraction(1, 25)
    encoder.options = options
    data = b""
    for index in range(8):
        frame = av.VideoFrame(320, 240, "yuv420p")
        frame.pts = index
        data += b"".join(bytes(p) for p in encoder.encode(frame))
    data += b"".join(bytes(p) for p in encoder.encode(None))
    return [u.strip(b"\x00") for u in data.split(b"\x00\x00\x01") if u.strip(b"\x00")]


@pytest.mark.parametrize(
    ("options", "profile", "expected"),
    [
        ({"bf": "0"}, "main", 0),
        ({"bf": "2", "x264-params": "b-pyramid=none"}, "main", 1),
        ({"bf": "3", "x264-params": "b-pyramid=normal"}, "high", 2),
        ({}, "baseline", 0),
    ],
)
def test_the_sps_says_how_many_frames_b_frames_hold_back(
    options: dict[str, str], profile: str, expected: int
) -> None:
    units = encoded_units("libx264", {"profile": profile, **options})
    sps = next(u for u in units if u[0] & 0x1F == 7)
    assert h264_reorder_frames(sps) == expected


def test_an_h265_sps_says_its_reordering_depth() -> None:
    units = encoded_units("libx265", {"x265-params": "bframes=3:b-pyramid=1:log-level=error"})
    sps = next(u for u in units if (u[0] >> 1) & 0x3F == 33)
    assert h265_reorder_frames(sps) == 2


def test_snapshots_paced_on_the_cameras_clock_decode_half_of_each_group() -> None:
    """1/s at GOP 50, 25 fps: each 2 s group costs its keyframe and frames up to the 25th, where
    the snapshot between two keyframes falls exactly on the camera's clock."""
    plan: SnapshotPlan[int] = SnapshotPlan([1.0], max_waiting=600)
    decoded, snapshots = 0, 0
    for index in range(25 * 20):
        step = plan.add(index, keyframe=index % 50 == 0, now=index / 25)
        if step is not None:
            decoded += len(step.packets)
            snapshots += len(step.due)
    assert snapshots == 20
    assert decoded == 10 * 26  # ten groups: keyframe + 25 frames each
