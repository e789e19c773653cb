"""Output files of *-to-fs tasks: names, crash-safe writing, retention and the low-disk guard.

Files are written under a hidden temporary name in the same folder and renamed when complete, so a
crash never leaves a half-written file under a final name. Final names sort by time:
``<UTC timestamp>-<sequence>.<ext>``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

TEMP_PREFIX = "."
TEMP_SUFFIX = ".partial"


def final_name(moment: datetime, sequence: int, extension: str) -> str:
    stamp = moment.astimezone(UTC).strftime("%Y%m%dT%H%M%S.%f")[:-3]
    return f"{stamp}Z-{sequence:06d}.{extension}"


def temporary_path(final: Path) -> Path:
    return final.with_name(f"{TEMP_PREFIX}{final.name}{TEMP_SUFFIX}")


def is_temporary(path: Path) -> bool:
    return path.name.startswith(TEMP_PREFIX) and path.name.endswith(TEMP_SUFFIX)


def write_atomically(final: Path, data: bytes) -> None:
    temporary = temporary_path(final)
    with temporary.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(final)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Leftovers of a crash: never complete, so they are removed, not published."""
    removed = []
    for path in folder.iterdir():
        if is_temporary(path) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


@dataclass(frozen=True)
class StoredFile:
    path: Path
    size_bytes: int
    modified: float


@dataclass(frozen=True)
class Retention:
    """Limits on what a task keeps (0 disables a limit)."""

    max_age_s: float = 0
    max_files: int = 0
    max_bytes: int = 0

    def to_delete(self, files: Iterable[StoredFile], now: float) -> list[StoredFile]:
        """Oldest first: files past ``max_age_s``, then beyond ``max_files``, then ``max_bytes``."""
        ordered = sorted(files, key=lambda f: (f.modified, f.path.name))
        doomed = [f for f in ordered if self.max_age_s and now - f.modified > self.max_age_s]
        kept = [f for f in ordered if f not in doomed]
        if self.max_files and len(kept) > self.max_files:
            excess = len(kept) - self.max_files
            doomed += kept[:excess]
            kept = kept[excess:]
        if self.max_bytes:
            total = sum(f.size_bytes for f in kept)
            while kept and total > self.max_bytes:
                oldest = kept.pop(0)
                doomed.append(oldest)
                total -= oldest.size_bytes
        return doomed


def stored_files(folder: Path, extension: str) -> list[StoredFile]:
    files = []
    for entry in os.scandir(folder):
        if (
            entry.is_file()
            and entry.name.endswith(f".{extension}")
            and not entry.name.startswith(TEMP_PREFIX)
        ):
            stat = entry.stat()
            files.append(StoredFile(Path(entry.path), stat.st_size, stat.st_mtime))
    return files


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
