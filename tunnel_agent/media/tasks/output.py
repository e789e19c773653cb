"""The folder a *-to-fs task writes to: made ready once, checked for room, named, pruned."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Any

from tunnel_agent.media.files import (
    Retention,
    final_name,
    free_bytes,
    low_disk_reason,
    prepare_folder,
    remove_stale_temporaries,
    stored_files,
)
from tunnel_agent.media.settings import StreamSettings
from tunnel_agent.media.tasks.base import MediaTask, TaskError


class OutputFolder:
    def __init__(self, task: MediaTask[Any], settings: StreamSettings, extension: str) -> None:
        assert settings.path is not None
        self.task = task
        self.path: Path = settings.path
        self.extension = extension
        self.min_free_bytes = settings.min_free_bytes
        self.retention = Retention(settings.max_age, settings.max_files, settings.max_bytes)
        self._ready = False
        self._sequence = 0

    def has_room(self) -> bool:
        """Ready the folder (once) and check the low-disk guard; False pauses the task."""
        if not self._ready:
            try:
                prepare_folder(self.path)
                for stale in remove_stale_temporaries(self.path):
                    self.task.log.info("media.stale_temporary_removed", file=str(stale))
            except OSError as exc:
                raise TaskError(f"cannot write to {self.path}: {exc.strerror or exc}") from None
            self._ready = True
        free = free_bytes(self.path)
        if free < self.min_free_bytes:
            self.task.counters["skipped_low_disk"] += 1
            self.task.pause(low_disk_reason(free, self.min_free_bytes))
            return False
        return True

    def next_file(self, moment: datetime) -> Path:
        self._sequence += 1
        return self.path / final_name(moment, self._sequence, self.extension)

    def check_again(self) -> None:
        """After a write error: make sure the folder is still there before the next file."""
        self._ready = False

    def prune(self) -> None:
        for doomed in self.retention.to_delete(
            stored_files(self.path, self.extension), time.time()
        ):
            doomed.path.unlink(missing_ok=True)
            self.task.counters["deleted_by_retention"] += 1
