"""Decoding timestamps for video that RTP carries with presentation timestamps only. Pure code.

RTP stamps each frame with when it is shown; with B-frames that goes back and forth in the order
frames are sent (and decoded): I0 P3 B1 B2 P6 B4 B5. Muxers need a decoding timestamp that always
increases and is never after the frame's presentation. As FFmpeg does, a frame's DTS is the
smallest presentation time not yet used, once ``depth`` more frames have arrived: the sorted
presentation times, ``depth`` frames late. ``depth`` is how many frames the encoder reorders (the
SPS says so, ``codec_info``); the first ``depth`` frames get DTS one frame duration apart below the
first presentation time. A stream that reorders more than ``depth`` has frames whose presentation
would come before their DTS: those are refused and counted (no muxer takes them), so a reader that
cannot learn the depth from the stream guesses high (a frame more of delay costs nothing else).
"""

from __future__ import annotations

import heapq

MAX_DEPTH = 16  # H.264 and H.265 hold at most 16 frames


class DecodeOrder:
    """DTS for each frame, in arrival order, from presentation timestamps (any clock)."""

    def __init__(self, depth: int, frame_ticks: int) -> None:
        self.depth = min(max(depth, 0), MAX_DEPTH)
        self.frame_ticks = max(frame_ticks, 1)
        self.refused = 0
        self._waiting: list[int] = []  # presentation times not yet used as a DTS (a heap)
        self._frames = 0
        self._first_pts = 0
        self._last_dts: int | None = None

    def dts(self, pts: int) -> int | None:
        """The decoding timestamp of the next frame, or None for a frame no muxer would take."""
        if self._frames == 0:
            self._first_pts = pts
        heapq.heappush(self._waiting, pts)
        popped: int | None = None
        if self._frames < self.depth:
            dts = self._first_pts - (self.depth - self._frames) * self.frame_ticks
        else:
            dts = popped = heapq.heappop(self._waiting)
        self._frames += 1
        if self._last_dts is not None:
            dts = max(dts, self._last_dts + 1)
        if pts >= dts:
            self._last_dts = dts
            return dts
        self.refused += 1
        if popped != pts:
            self._waiting.remove(pts)
            heapq.heapify(self._waiting)
        return None
