"""Decisions on the packet path, kept pure: timestamps, snapshot pacing, keyframe-only decoding."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Generic, TypeVar

Waiting = TypeVar("Waiting")  # what a snapshot plan holds until it is decoded


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

    def jumped_back(self, dts: int, threshold: int) -> bool:
        """A step back larger than ``threshold`` ticks: the source restarted its timestamps."""
        return self._last is not None and dts < self._last - threshold

    def back_s(self, dts: int, time_base: Fraction) -> float:
        return float((self._last - dts) * time_base) if self._last is not None else 0.0

    def restart(self, dts: int) -> None:
        self._last = dts


EARLY_FRACTION = 0.1
KEYFRAME_WINDOW = 8  # keyframe times the rate is estimated from
KEYFRAMES_ON_MARGIN = (
    1.05  # decode keyframes only when every rate is within this of the keyframe rate
)
KEYFRAMES_OFF_MARGIN = 1.25  # and go back to every frame only when one rate is beyond this


@dataclass
class SnapshotPacer:
    """Whether a frame captured at ``now`` (seconds) is due, for a rate in snapshots per second.

    A rate of 0 means every frame. The schedule advances by whole periods so the long-run rate is
    exact even when frames arrive irregularly, but it never accumulates a backlog. How far a
    snapshot may be from its due time (``EARLY_FRACTION`` of a period, 0.1 s at 1/s):

    - A keyframe up to that much early counts as on time (keyframes one second apart must give one
      snapshot per second at 1/s, whatever their jitter), and the schedule restarts from it: the
      following snapshots fall on the next keyframes again (a group of pictures that lasts a whole
      number of periods) instead of a little after each, where every one would cost the decoding
      of the frames up to it.
    - A snapshot due on some other frame may wait for a keyframe expected within that much after
      its due time (see :meth:`waits_for_keyframe`): decoding the frames before a keyframe costs up
      to a whole group of pictures, for an image the keyframe gives a moment later.
    - Otherwise it is the first frame that arrives at or after its due time.

    So the latest a snapshot can be is the first frame that arrives after ``EARLY_FRACTION`` of a
    period past its due time (when an expected keyframe does not come); it is never of a frame
    from before its due time other than a keyframe at most ``EARLY_FRACTION`` of a period early.
    Times are arrival times (monotonic seconds) of the frames' packets.
    """

    rate_per_s: float
    _next_due: float | None = None

    @property
    def tolerance_s(self) -> float:
        return EARLY_FRACTION / self.rate_per_s if self.rate_per_s > 0 else 0.0

    def is_due(self, now: float, *, early: bool = True) -> bool:
        """Whether :meth:`due` would take a frame at ``now`` (without taking it); with
        ``early=False`` only once the due moment itself has come."""
        if self.rate_per_s <= 0 or self._next_due is None:
            return True
        return now >= self._next_due - (self.tolerance_s if early else 0.0)

    def waits_for_keyframe(self, now: float, next_keyframe_at: float | None) -> bool:
        """Whether the snapshot due at ``now`` should be taken from the keyframe expected at
        ``next_keyframe_at`` instead: only while both lie within the tolerance after its due time.
        """
        if self.rate_per_s <= 0 or self._next_due is None or next_keyframe_at is None:
            return False
        latest = self._next_due + self.tolerance_s
        # A keyframe expected long before the due time is a stale guess, not one coming now.
        expected = self._next_due - self.tolerance_s <= next_keyframe_at <= latest
        return now < latest and expected

    def due(self, now: float, *, keyframe: bool = False) -> bool:
        if self.rate_per_s <= 0:
            return True
        period = 1.0 / self.rate_per_s
        if self._next_due is None or now >= self._next_due + period:
            self._next_due = now + period
            return True
        if now >= self._next_due - self.tolerance_s:
            early = keyframe and now < self._next_due
            self._next_due = (now if early else self._next_due) + period
            return True
        return False


@dataclass
class KeyframeRate:
    """Keyframes per second, estimated from the last few keyframe times."""

    _times: deque[float] = field(default_factory=lambda: deque(maxlen=KEYFRAME_WINDOW))

    def keyframe(self, now: float) -> None:
        self._times.append(now)

    @property
    def per_second(self) -> float | None:
        if len(self._times) < 2:
            return None
        span = self._times[-1] - self._times[0]
        return (len(self._times) - 1) / span if span > 0 else None

    @property
    def next_at(self) -> float | None:
        """When the next keyframe is expected: as far after the last one as that was after the one
        before (a camera's keyframe interval is regular; the mean over the window would carry
        one irregular interval, at a stream's start, into several guesses)."""
        if len(self._times) < 2:
            return None
        return 2 * self._times[-1] - self._times[-2]


def keyframes_suffice(
    rates_per_s: list[float], keyframe_rate: float | None, *, currently: bool = False
) -> bool:
    """Decode keyframes only when every snapshot task asks for at most the keyframe rate.

    With hysteresis: a rate equal to the keyframe rate (1/s on a camera with a keyframe a second)
    must not flip the decoder on and off as the measured keyframe rate wobbles around it.
    """
    if not rates_per_s or keyframe_rate is None or any(rate <= 0 for rate in rates_per_s):
        return False
    margin = KEYFRAMES_OFF_MARGIN if currently else KEYFRAMES_ON_MARGIN
    return max(rates_per_s) <= keyframe_rate * margin


def backfill_dts(count: int, known_dts: int, last_dts: int | None, step: int) -> list[int | None]:
    """DTS for ``count`` packets that arrived without one, just before a packet with ``known_dts``.

    Demuxers leave the DTS out where they cannot know it yet: the first packets of a Matroska file
    with B-frames (the reordering delay is learned a few packets later). Those packets are the
    keyframe a loop starts with, so they are given DTS ``step`` apart below ``known_dts`` (each
    strictly above ``last_dts``, the DTS before them); a packet that cannot fit gets None.
    """
    step = max(step, 1)
    wanted = [known_dts - step * (count - i) for i in range(count)]
    if last_dts is None or not wanted or wanted[0] > last_dts:
        return list(wanted)
    spacing = (known_dts - last_dts) // (count + 1)
    if spacing >= 1:
        return [last_dts + spacing * (i + 1) for i in range(count)]
    room = min(max(known_dts - last_dts - 1, 0), count)  # fit one tick apart, the latest kept
    return [None] * (count - room) + [known_dts - room + i for i in range(room)]


def forward_dts(count: int, last_dts: int | None, first_pts: int | None, step: int) -> list[int]:
    """DTS for packets of a stream that gives none for a while: on from the last, ``step`` apart."""
    start = (last_dts + max(step, 1)) if last_dts is not None else (first_pts or 0)
    return [start + max(step, 1) * i for i in range(count)]


@dataclass
class DecodeStep(Generic[Waiting]):
    """Packets to decode now, in order, and the frame tasks the newest decoded frame goes to.

    ``drain`` (keyframes only) asks for the decoder to be emptied after them: a decoder with a
    reordering delay would hold the keyframe back until the next one."""

    packets: list[Waiting]
    due: list[int]
    drain: bool


class SnapshotPlan(Generic[Waiting]):
    """Decode only what a snapshot needs: up to the packet at which one falls due.

    Packets since the last keyframe wait, undecoded; when a snapshot task is due they are decoded
    in one go and the newest frame is delivered. What remains of a group of pictures when the next
    keyframe arrives was never needed and is never decoded. A snapshot falls on a keyframe
    whenever the pacer's tolerance allows (see ``SnapshotPacer``): a keyframe a little early is on
    time and restarts the schedule, and a snapshot due just before the next keyframe waits for it,
    so at 1/s on a camera with a keyframe every 2 s each group costs its keyframe and the frames up
    to the middle one. When every rate is at most the keyframe rate, only keyframes are decoded.
    Times (``now``) are seconds on one clock: the camera's timestamps, or arrival times.
    """

    def __init__(self, rates_per_s: list[float], max_waiting: int) -> None:
        self.rates_per_s = rates_per_s
        self.max_waiting = max_waiting
        self.pacers = [SnapshotPacer(rate) for rate in rates_per_s]
        self.keyframe_rate = KeyframeRate()
        self.keyframes_only = False
        self._waiting: list[Waiting] = []

    def add(self, packet: Waiting, *, keyframe: bool, now: float) -> DecodeStep[Waiting] | None:
        """What to decode once ``packet`` (captured at ``now``) has arrived; None: nothing yet."""
        if keyframe:
            self.keyframe_rate.keyframe(now)
            self.keyframes_only = keyframes_suffice(
                self.rates_per_s, self.keyframe_rate.per_second, currently=self.keyframes_only
            )
            self._waiting.clear()
        elif self.keyframes_only:
            return None
        self._waiting.append(packet)
        # Early is on time only for a keyframe, and a frame just before one leaves its snapshot to
        # it: either would cost the decoding of the whole group of pictures for an image the
        # keyframe gives a moment later.
        pacers = [pacer for pacer in self.pacers if pacer.is_due(now, early=keyframe)]
        next_keyframe_at = None if keyframe else self.keyframe_rate.next_at
        due = bool(pacers) and not all(
            pacer.waits_for_keyframe(now, next_keyframe_at) for pacer in pacers
        )
        if not due and len(self._waiting) < self.max_waiting:
            return None
        packets, self._waiting = self._waiting, []
        tasks = [i for i, p in enumerate(self.pacers) if due and p.due(now, keyframe=keyframe)]
        return DecodeStep(packets, tasks, self.keyframes_only)
