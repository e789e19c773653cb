"""Output files of *-to-fs tasks: where they go, their names, crash-safe writing, retention.

Files are written under a hidden temporary name in the same folder, flushed to disk, renamed, and
the folder is flushed too, so that after a crash or a power cut a final name always holds a
complete file. Each stream names its files ``<stream>-<UTC timestamp>-<sequence>.<ext>``; they sort
by time, and retention, the clean-up of temporaries and salvaging only ever touch names of that
exact pattern, never another stream's or anybody else's file in the same folder.

Folders named by the cloud (the ``mediaStreams`` twin property) are relative to ``output_root`` and
must stay inside it once symbolic links are followed.
"""

from __future__ import annotations

import os
import re
import shutil
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path

TEMP_PREFIX = "."
TEMP_SUFFIX = ".partial"
SCRATCH_INFIX = ".salvage"  # a salvage in progress: .<final>.salvage.partial


class PathRefused(ValueError):
    """A folder that may not be written to; the message says why."""


def stream_folder(path: Path, output_root: Path) -> Path:
    """Where a configured stream writes: an absolute path is the administrator's choice and is
    used as it is; a relative one is under ``output_root`` and must stay there."""
    return path if path.is_absolute() else confined_folder(path, output_root)


def confined_folder(path: Path, output_root: Path) -> Path:
    """``output_root / path`` with symbolic links followed; PathRefused unless it stays inside.

    Nothing is created: the check holds for folders that do not exist yet as well.
    """
    if path.is_absolute():
        raise PathRefused("must be relative to [media] output_root")
    if ".." in path.parts:
        raise PathRefused("must not contain '..'")
    try:
        root = output_root.resolve()
        resolved = (root / path).resolve()
    except (OSError, RuntimeError):
        raise PathRefused("cannot be resolved (a symbolic link loop?)") from None
    if not resolved.is_relative_to(root):
        raise PathRefused("leaves [media] output_root through a symbolic link")
    return resolved


def temporary_path(final: Path) -> Path:
    return final.with_name(f"{TEMP_PREFIX}{final.name}{TEMP_SUFFIX}")


def scratch_path(final: Path) -> Path:
    return final.with_name(f"{TEMP_PREFIX}{final.name}{SCRATCH_INFIX}{TEMP_SUFFIX}")


def is_scratch(path: Path) -> bool:
    return path.name.endswith(SCRATCH_INFIX + TEMP_SUFFIX)


def final_path(temporary: Path) -> Path:
    """The name a temporary (or a salvage scratch) file was meant to get."""
    name = temporary.name[len(TEMP_PREFIX) : -len(TEMP_SUFFIX)]
    return temporary.with_name(name.removesuffix(SCRATCH_INFIX))


def fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (the new name lives in the folder's own data)."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def publish(temporary: Path, final: Path) -> None:
    """Give a complete file its final name: its data on disk first, then the name, durably."""
    descriptor = os.open(temporary, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    temporary.replace(final)
    fsync_folder(final.parent)


def write_atomically(final: Path, data: bytes) -> None:
    temporary = temporary_path(final)
    with temporary.open("wb") as handle:
        handle.write(data)
    publish(temporary, final)


@dataclass(frozen=True)
class StreamFiles:
    """The names one stream gives its files; a name of any other shape is not the stream's."""

    stream: str
    extension: str

    def final_name(self, moment: datetime, sequence: int) -> str:
        stamp = moment.astimezone(UTC).strftime("%Y%m%dT%H%M%S.%f")[:-3]
        return f"{self.stream}-{stamp}Z-{sequence:06d}.{self.extension}"

    @cached_property
    def _pattern(self) -> re.Pattern[str]:
        return re.compile(
            rf"{re.escape(self.stream)}-\d{{8}}T\d{{6}}\.\d{{3}}Z-\d{{6}}\.{re.escape(self.extension)}"
        )

    def is_own(self, name: str) -> bool:
        return self._pattern.fullmatch(name) is not None

    def is_own_temporary(self, name: str) -> bool:
        if not (name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)):
            return False
        middle = name[len(TEMP_PREFIX) : -len(TEMP_SUFFIX)]
        return self.is_own(middle.removesuffix(SCRATCH_INFIX))

    def temporaries(self, folder: Path) -> list[Path]:
        """What a crash left of this stream's files (never complete, never published):
        interrupted salvages first, then the files that were being written."""
        with os.scandir(folder) as entries:
            found = [
                Path(e.path)
                for e in entries
                if self.is_own_temporary(e.name) and e.is_file(follow_symlinks=False)
            ]
        return sorted(found, key=lambda path: (not is_scratch(path), path.name))


@dataclass(frozen=True)
class StoredFile:
    path: Path
    size_bytes: int
    modified: float


@dataclass(frozen=True)
class Retention:
    """Limits on what a stream keeps (0 disables a limit)."""

    max_age_s: float = 0
    max_files: int = 0
    max_bytes: int = 0

    @property
    def enabled(self) -> bool:
        return bool(self.max_age_s or self.max_files or self.max_bytes)


class RetentionIndex:
    """One stream's files in its folder, oldest first: the folder is scanned once, then each new
    file is added, so the cost of keeping the limits does not grow with the number of files.

    Files deleted behind the agent's back are noticed when their turn to be deleted comes.
    """

    def __init__(self, folder: Path, files: StreamFiles, retention: Retention) -> None:
        self.folder = folder
        self.files = files
        self.retention = retention
        self._stored: deque[StoredFile] | None = None
        self._total_bytes = 0

    @property
    def count(self) -> int:
        return len(self._stored) if self._stored is not None else 0

    @property
    def total_bytes(self) -> int:
        return self._total_bytes

    def _scan(self) -> deque[StoredFile]:
        found = []
        with os.scandir(self.folder) as entries:
            for entry in entries:
                if self.files.is_own(entry.name) and entry.is_file(follow_symlinks=False):
                    stat = entry.stat(follow_symlinks=False)
                    found.append(StoredFile(Path(entry.path), stat.st_size, stat.st_mtime))
        found.sort(key=lambda f: f.path.name)  # the names sort by time
        self._total_bytes = sum(f.size_bytes for f in found)
        return deque(found)

    def added(self, path: Path, size_bytes: int, modified: float) -> list[StoredFile]:
        """Record a new file and return the files that now fall outside the limits (oldest
        first); the caller deletes them. Nothing is scanned or kept without limits."""
        if not self.retention.enabled:
            return []
        if self._stored is None:
            self._stored = self._scan()  # the new file is in it already
        else:
            self._stored.append(StoredFile(path, size_bytes, modified))
            self._total_bytes += size_bytes
        return self._expired(modified)

    def _expired(self, now: float) -> list[StoredFile]:
        stored, limits = self._stored, self.retention
        assert stored is not None
        doomed = []
        while stored and (
            (limits.max_age_s and now - stored[0].modified > limits.max_age_s)
            or (limits.max_files and len(stored) > limits.max_files)
            or (limits.max_bytes and self._total_bytes > limits.max_bytes)
        ):
            oldest = stored.popleft()
            self._total_bytes -= oldest.size_bytes
            doomed.append(oldest)
        return doomed

    def forget(self) -> None:
        """Scan again before the next decision (the folder may have been replaced)."""
        self._stored = None


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def low_disk_reason(free: int, required: int) -> str:
    return f"low disk: {free // 2**20} MiB free, {required // 2**20} MiB required"


def prepare_folder(folder: Path) -> None:
    """Create the folder and prove it is writable (raises OSError naming the problem)."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f"{TEMP_PREFIX}write-test{TEMP_SUFFIX}"
    probe.write_bytes(b"")
    probe.unlink()
