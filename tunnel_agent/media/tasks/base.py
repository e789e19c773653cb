"""What every media task shares: its own thread, a bounded queue, a state, counters, isolation.

The camera source must never wait for a task (a slow disk or a dead media server would stall every
other task of the camera), so it only ``offer``s items: when a task's queue is full the oldest item
is dropped and counted. Packets travel in batches of ``batch_s`` seconds of video: each hand-over
wakes the task's thread (a futex wake-up, a context switch, a GIL hand-off), and at 25 packets per
second those wake-ups cost more CPU than the work on the packets. A task that fails is marked
failed with the reason, retried after a backoff, and never stops the other tasks or the tunnels.
"""

from __future__ import annotations

import enum
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Generic, TypeVar

from tunnel_agent.logs import EventLogger, redact_text
from tunnel_agent.media.backoff import Backoff
from tunnel_agent.media.packets import CapturedFrame, MediaPacket, StreamTemplate
from tunnel_agent.media.settings import StreamSettings

Item = TypeVar("Item")
STOP_TIMEOUT_S = 10.0


class TaskState(enum.Enum):
    STARTING = "starting"
    WAITING = "waiting for the source"
    RUNNING = "running"
    BACKING_OFF = "backing off"
    PAUSED = "paused"
    FAILED = "failed"
    STOPPED = "stopped"


class TaskError(Exception):
    """A task cannot do its job right now; the message is the reason shown in logs and status."""


class _Stop:
    pass


_STOP = _Stop()


class MediaTask(Generic[Item]):
    """A worker thread fed through ``offer``; subclasses implement ``handle`` (and ``close``)."""

    queue_size = 64

    def __init__(self, camera: str, settings: StreamSettings, backoff: Backoff) -> None:
        self.camera = camera
        self.settings = settings
        self.name = settings.name
        self.kind = settings.task
        self.log = EventLogger("tunnel_agent.media").bind(
            camera=camera, stream=settings.name, task=settings.task
        )
        self.counters: Counter[str] = Counter()
        self.state = TaskState.STARTING
        self.reason: str | None = None
        self._backoff = backoff
        self._retry_at = 0.0
        self._running_since = 0.0
        # Items go in lists, so that one hand-over can carry several (see PacketTask).
        self._queue: queue.Queue[list[Item] | _Stop] = queue.Queue(self.queue_size)
        self._thread = threading.Thread(
            target=self._run, name=f"media-{camera}-{self.name}", daemon=True
        )
        self._lock = threading.Lock()

    # -- called from other threads ------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._offer(_STOP, force=True)
        self._thread.join(STOP_TIMEOUT_S)

    def _offer(self, item: list[Item] | _Stop, *, force: bool = False) -> None:
        with self._lock:
            while True:
                try:
                    self._queue.put_nowait(item)
                    return
                except queue.Full:
                    try:
                        dropped = self._queue.get_nowait()
                    except queue.Empty:
                        continue
                    if isinstance(dropped, _Stop):
                        if not force:
                            self._queue.put_nowait(dropped)
                            return
                    else:
                        self.counters["dropped_queue_full"] += len(dropped)

    # -- the task's thread ----------------------------------------------------------------------

    def _run(self) -> None:
        self._set_state(TaskState.WAITING)
        try:
            self.begin()
        except TaskError as exc:
            self._fail(str(exc))
        except Exception as exc:
            self._fail(f"{type(exc).__name__}: {exc}")
        while True:
            items = self._queue.get()
            if isinstance(items, _Stop):
                break
            for item in items:
                self._handle_one(item)
            self._guarded(self.after_batch)
        try:
            self.close()
        except Exception as exc:
            self.log.warning("media.task_close_failed", error=f"{type(exc).__name__}: {exc}")
        self._set_state(TaskState.STOPPED)

    def _handle_one(self, item: Item) -> None:
        if self.state in (TaskState.FAILED, TaskState.BACKING_OFF) and (
            time.monotonic() < self._retry_at
        ):
            self.counters["dropped_while_failed"] += 1
            return
        self._guarded(self.handle, item)

    def _guarded(self, work: Callable[..., None], *args: object) -> None:
        try:
            work(*args)
        except TaskError as exc:
            self._fail(str(exc))
        except Exception as exc:
            self._fail(f"{type(exc).__name__}: {exc}")

    def _fail(self, reason: str) -> None:
        delay = self._backoff.next_delay()
        self._retry_at = time.monotonic() + delay
        self.counters["failures"] += 1
        self._set_state(TaskState.FAILED, reason, retry_in_s=round(delay, 1))
        try:
            self.reset()
        except Exception as exc:
            self.log.warning("media.task_reset_failed", error=f"{type(exc).__name__}: {exc}")

    def _set_state(self, state: TaskState, reason: str | None = None, **fields: object) -> None:
        # The reason goes to /status and the twin as well as the log: scrub it here, once.
        reason = redact_text(reason) if reason is not None else None
        if state == self.state and reason == self.reason:
            return
        self.state, self.reason = state, reason
        log = self.log.warning if state in (TaskState.FAILED, TaskState.PAUSED) else self.log.info
        log("media.task_state", state=state.value, reason=reason, **fields, **dict(self.counters))

    def running(self) -> None:
        """Subclasses call this on each success; a stable stretch of them resets the backoff."""
        now = time.monotonic()
        if self.state != TaskState.RUNNING:
            self._running_since = now
            self._set_state(TaskState.RUNNING)
        elif now - self._running_since >= self._backoff.stable_after_s:
            self._backoff.ran_for(now - self._running_since)

    def pause(self, reason: str) -> None:
        self._set_state(TaskState.PAUSED, reason)

    # -- for subclasses -------------------------------------------------------------------------

    def handle(self, item: Item) -> None:
        raise NotImplementedError

    def after_batch(self) -> None:
        """Work after the items of one hand-over, e.g. writing out what they gathered."""

    def begin(self) -> None:
        """Work before the first item, e.g. recovering the files a crash left."""

    def reset(self) -> None:
        """Drop whatever half-done work a failure left (an open file, a connection)."""

    def close(self) -> None:
        """Finish cleanly on stop: complete or remove files, close connections."""

    def status(self) -> dict[str, object]:
        return {"state": self.state.value, "reason": self.reason, **dict(self.counters)}


class PacketTask(MediaTask[MediaPacket | StreamTemplate]):
    """A task fed with the camera's packets (clips, re-streaming), in batches.

    ``on_packet`` and ``flush`` are called by the source's thread only; a batch goes to the task
    once it spans ``batch_s`` seconds of video, when a new stream starts, and when the source
    stops reading (``flush``), so nothing waits longer than that for its hand-over. ``queue_size``
    counts batches.
    """

    needs_packets = True
    needs_frames = False
    batch_s = 0.1

    def __init__(self, camera: str, settings: StreamSettings, backoff: Backoff) -> None:
        super().__init__(camera, settings, backoff)
        self._batch: list[MediaPacket | StreamTemplate] = []
        self._batch_from_s = 0.0

    def on_stream(self, template: StreamTemplate) -> None:
        self.flush()
        self._offer([template])

    def on_packet(self, packet: MediaPacket) -> None:
        seconds = packet.seconds
        if not self._batch:
            self._batch_from_s = seconds
        self._batch.append(packet)
        if seconds - self._batch_from_s >= self.batch_s:
            self.flush()

    def flush(self) -> None:
        """Hand over the packets collected so far."""
        if self._batch:
            batch, self._batch = self._batch, []
            self._offer(batch)


class FrameTask(MediaTask[CapturedFrame]):
    """A task fed with decoded frames (snapshots); the source paces them at ``rate_per_s``."""

    needs_packets = False
    needs_frames = True
    queue_size = 2

    @property
    def rate_per_s(self) -> float:
        return self.settings.snapshots_per_second

    def on_frame(self, frame: CapturedFrame) -> None:
        self._offer([frame])
