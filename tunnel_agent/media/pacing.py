"""Decisions on the packet path, kept pure: timestamps, snapshot pacing, keyframe-only decoding."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


class TimestampValidator:
    """Drop packets without a DTS or whose DTS does not increase (muxers reject them)."""

    def __init__(self) -> None:
        self._last: int | None = None
        self.dropped = 0

    def is_valid(self, dts: int | None) -> bool:
        if dts is None or (self._last is not None and dts <= self._last):
            self.dropped += 1
            return False
        self._last = dts
        return True

    def reset(self) -> None:
        self._last = None


@dataclass
class SnapshotPacer:
    """Whether a frame captured at ``now`` (seconds) is due, for a rate in snapshots per second.

    A rate of 0 means every frame. The schedule advances by whole periods so the long-run rate is
    exact even when frames arrive irregularly, but it never accumulates a backlog.
    """

    rate_per_s: float
    _next_due: float | None = None

    def due(self, now: float) -> bool:
        if self.rate_per_s <= 0:
            return True
        period = 1.0 / self.rate_per_s
        if self._next_due is None or now >= self._next_due + period:
            self._next_due = now + period
            return True
        if now >= self._next_due:
            self._next_due += period
            return True
        return False


@dataclass
class KeyframeRate:
    """Keyframes per second, estimated from the last few keyframe times."""

    window: int = 8
    _times: deque[float] = field(default_factory=lambda: deque(maxlen=8))

    def keyframe(self, now: float) -> None:
        self._times.append(now)

    @property
    def per_second(self) -> float | None:
        if len(self._times) < 2:
            return None
        span = self._times[-1] - self._times[0]
        return (len(self._times) - 1) / span if span > 0 else None


def keyframes_suffice(rates_per_s: list[float], keyframe_rate: float | None) -> bool:
    """Decode keyframes only when every snapshot task asks for at most the keyframe rate."""
    if not rates_per_s or keyframe_rate is None:
        return False
    return all(0 < rate <= keyframe_rate for rate in rates_per_s)
