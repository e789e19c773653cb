"""Fan-out of one camera's fragments to many viewers: a GOP cache and bounded per-viewer queues.

Pure bookkeeping, no I/O: the watch feeds fragments in on the event loop and each viewer's sender
takes them out. Nothing here ever waits for a viewer, so a slow one cannot slow the others.

- ``GopCache`` holds the init segment and the fragments since the last keyframe, so a viewer who
  joins late starts at once, from that keyframe, instead of waiting for the next one.
- ``ViewerQueue`` is bounded in bytes. A viewer whose queue would overflow loses what is queued and
  skips ahead to the next keyframe (a decoder cannot start anywhere else); one that keeps
  overflowing is told to go (``overflows_to_disconnect`` within ``overflow_window_s``).
  Fragments queued together leave together, as one WebSocket message (MSE takes any run of whole
  fragments in one append): a late joiner's cached GOP is one message, not dozens.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from tunnel_agent.cloud.relay.view.segments import Fragment, InitSegment

MAX_MESSAGE_BYTES = 1024 * 1024  # fragments joined into one message, at most


class GopCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.init: InitSegment | None = None
        self._fragments: list[Fragment] = []
        self._bytes = 0

    def on_init(self, init: InitSegment) -> None:
        self.init = init
        self._fragments.clear()
        self._bytes = 0

    def on_fragment(self, fragment: Fragment) -> None:
        if self.init is None or fragment.generation != self.init.generation:
            return
        if fragment.keyframe:
            self._fragments.clear()
            self._bytes = 0
        elif not self._fragments or self._bytes + len(fragment.data) > self.max_bytes:
            # No keyframe to start from, or a GOP too long to keep: late joiners wait for the
            # next keyframe instead of the cache growing without bound.
            self._fragments.clear()
            self._bytes = 0
            return
        self._fragments.append(fragment)
        self._bytes += len(fragment.data)

    def start(self) -> list[Fragment]:
        """What a new viewer gets first: the current GOP from its keyframe (maybe nothing)."""
        return list(self._fragments)

    @property
    def cached_bytes(self) -> int:
        return self._bytes


class Offer(enum.Enum):
    QUEUED = "queued"
    SKIPPED = "skipped"  # waiting for a keyframe
    OVERFLOWED = "overflowed"  # queue dropped, now waiting for a keyframe
    DISCONNECT = "disconnect"  # overflowed too often: the viewer should be closed


@dataclass
class ViewerQueue:
    max_bytes: int
    overflows_to_disconnect: int = 3
    overflow_window_s: float = 30.0
    _items: deque[bytes] = field(default_factory=deque)
    _bytes: int = 0
    _init: bytes | None = None
    _announce: str | None = None
    _status: str | None = None
    waiting_for_keyframe: bool = True
    generation: int | None = None
    overflow_times: deque[float] = field(default_factory=deque)
    fragments_dropped: int = 0
    fragments_skipped: int = 0

    def start(self, init: InitSegment, gop: list[Fragment], announce: str) -> None:
        """Begin (or begin again, on a new camera connection) with ``init`` and a cached GOP.

        ``announce`` (the stream's description) and the init segment go out first and are never
        dropped: without them nothing after can be played.
        """
        self._items.clear()
        self._bytes = 0
        self.generation = init.generation
        self.waiting_for_keyframe = True
        self._announce = announce
        self._init = init.data
        for fragment in gop:
            self.offer(fragment, now=0.0)

    def offer(self, fragment: Fragment, now: float) -> Offer:
        if fragment.generation != self.generation:
            return Offer.SKIPPED
        if self.waiting_for_keyframe:
            if not fragment.keyframe:
                self.fragments_skipped += 1
                return Offer.SKIPPED
            self.waiting_for_keyframe = False
        size = len(fragment.data)
        if self._items and self._bytes + size > self.max_bytes:
            self.fragments_dropped += len(self._items) + 1
            self._items.clear()
            self._bytes = 0
            self.waiting_for_keyframe = not fragment.keyframe
            if fragment.keyframe:
                self._push(fragment.data)
            self.overflow_times.append(now)
            while self.overflow_times and now - self.overflow_times[0] > self.overflow_window_s:
                self.overflow_times.popleft()
            if len(self.overflow_times) >= self.overflows_to_disconnect:
                return Offer.DISCONNECT
            return Offer.OVERFLOWED
        self._push(fragment.data)
        return Offer.QUEUED

    def _push(self, data: bytes) -> None:
        self._items.append(data)
        self._bytes += len(data)

    def set_status(self, status: str) -> None:
        """A status line to send before further fragments; only the latest one is kept."""
        self._status = status

    def pop(self) -> bytes | str | None:
        """The next message: the stream's description, its init segment, a status, then every
        queued fragment (up to ``MAX_MESSAGE_BYTES``) joined."""
        if self._announce is not None:
            text, self._announce = self._announce, None
            return text
        if self._init is not None:
            data, self._init = self._init, None
            return data
        if self._status is not None:
            text, self._status = self._status, None
            return text
        if not self._items:
            return None
        data = self._items.popleft()
        if self._items and len(data) + len(self._items[0]) <= MAX_MESSAGE_BYTES:
            run = [data]
            size = len(data)
            while self._items and size + len(self._items[0]) <= MAX_MESSAGE_BYTES:
                size += len(self._items[0])
                run.append(self._items.popleft())
            data = b"".join(run)
        self._bytes -= len(data)
        return data

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return (
            len(self._items)
            + (self._init is not None)
            + (self._announce is not None)
            + (self._status is not None)
        )
