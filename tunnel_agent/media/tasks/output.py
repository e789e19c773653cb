"""The folder a *-to-fs task writes to: made ready once, checked for room, named, pruned.

Only this stream's own files (its name pattern) are ever recovered, counted or deleted here.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from tunnel_agent.media.files import (
    Retention,
    RetentionIndex,
    StreamFiles,
    free_bytes,
    low_disk_reason,
    prepare_folder,
)
from tunnel_agent.media.settings import StreamSettings
from tunnel_agent.media.tasks.base import MediaTask, TaskError

# What to do with a temporary file a crash left: salvage it, or remove it.
Recover = Callable[[Path], None]


class OutputFolder:
    def __init__(
        self,
        task: MediaTask[Any],
        settings: StreamSettings,
        extension: str,
        folder: Path,
        recover: Recover | None = None,
    ) -> None:
        self.task = task
        self.path = folder
        self.files = StreamFiles(settings.name, extension)
        self.min_free_bytes = settings.min_free_bytes
        self.index = RetentionIndex(
            folder, self.files, Retention(settings.max_age, settings.max_files, settings.max_bytes)
        )
        self._recover = recover or self._remove_leftover
        self._ready = False
        self._sequence = 0

    def prepare(self) -> None:
        """Create the folder, prove it writable, and deal with what a crash left (once)."""
        if self._ready:
            return
        try:
            prepare_folder(self.path)
            leftovers = self.files.temporaries(self.path)
        except OSError as exc:
            raise TaskError(f"cannot write to {self.path}: {exc.strerror or exc}") from None
        for leftover in leftovers:
            self._recover(leftover)
        self._ready = True

    def has_room(self) -> bool:
        """Ready the folder and check the low-disk guard; False pauses the task."""
        self.prepare()
        free = free_bytes(self.path)
        if free < self.min_free_bytes:
            self.task.counters["skipped_low_disk"] += 1
            self.task.pause(low_disk_reason(free, self.min_free_bytes))
            return False
        return True

    def next_file(self, moment: datetime) -> Path:
        self._sequence += 1
        return self.path / self.files.final_name(moment, self._sequence)

    def check_again(self) -> None:
        """After a write error: make sure the folder is still there before the next file."""
        self._ready = False
        self.index.forget()

    def published(self, final: Path, size_bytes: int, modified: float) -> None:
        """A new file is complete: keep the retention limits."""
        for doomed in self.index.added(final, size_bytes, modified):
            doomed.path.unlink(missing_ok=True)
            self.task.counters["deleted_by_retention"] += 1

    def _remove_leftover(self, leftover: Path) -> None:
        leftover.unlink(missing_ok=True)
        self.task.counters["partial_files_removed"] += 1
        self.task.log.info("media.partial_file_removed", file=leftover.name)
