"""What retention costs per new file when the folder already holds many files.

A real snapshot-to-fs task's output folder (``OutputFolder``, its ``RetentionIndex``) in a scratch
folder filled with ``--files`` files of the stream's own name pattern (and as many foreign ones,
which retention must skip). Each new file is written as the task writes it (temporary, fsync,
rename, folder fsync) and then handed to retention, with ``max_files`` equal to the folder's count,
so that every new file deletes the oldest. Printed per file, medians of ``--rounds`` runs:

- ``write`` (no limits: retention is skipped and nothing is scanned),
- ``retention`` (the index: the time ``published()`` takes, deleting included),
- the one-time scan the index starts from, and for comparison
- ``rescan`` (what the agent did before: a scan and sort of the folder after every file).

The same with ``--small`` files shows that the index's cost per file does not depend on the count.

    python -m bench.retention [--files 100000] [--small 1000] [--new 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.common import entry_point, environment, table
from tunnel_agent.media.backoff import Backoff
from tunnel_agent.media.files import StreamFiles, write_atomically
from tunnel_agent.media.settings import StreamSettings
from tunnel_agent.media.tasks.snapshot import SnapshotToFs

START = datetime(2026, 1, 1, tzinfo=UTC)
IMAGE = b"\x89PNG" + bytes(2044)  # a small image: the figures are about names, not bytes
RESCAN_SAMPLES = 20


def fill(folder: Path, count: int) -> None:
    """``count`` files of the stream (oldest first) and ``count`` foreign ones."""
    files = StreamFiles("snaps", "png")
    for index in range(count):
        moment = START + timedelta(seconds=index)
        (folder / files.final_name(moment, index % 1_000_000)).write_bytes(IMAGE)
        (folder / f"foreign-{index:07d}.png").write_bytes(IMAGE)


def task(folder: Path, max_files: int) -> SnapshotToFs:
    settings = StreamSettings(
        name="snaps", task="snapshot-to-fs", path=folder, max_files=max_files, min_free_bytes=0
    )
    snapshot = SnapshotToFs("bench", settings, Backoff(1, 2, 60), folder)
    snapshot.output.prepare()
    return snapshot


def run(folder: Path, count: int, new: int) -> dict[str, float]:
    """Seconds per new file: writing alone, retention on top, the first scan, a full rescan."""
    fill(folder, count)
    limited = task(folder, max_files=count)
    unlimited = task(folder, max_files=0)
    moment = START + timedelta(days=30)

    def write(output_task: SnapshotToFs, index: int) -> tuple[Path, float]:
        target = output_task.output.next_file(moment + timedelta(seconds=index))
        started = time.perf_counter()
        write_atomically(target, IMAGE)
        return target, time.perf_counter() - started

    writes = []
    for index in range(new):
        target, took = write(unlimited, index)
        unlimited.output.published(target, len(IMAGE), time.time())
        target.unlink()  # keep the count as it was
        writes.append(took)

    target, _ = write(limited, new)
    started = time.perf_counter()
    limited.output.published(target, len(IMAGE), time.time())  # the one scan
    first = time.perf_counter() - started

    retained = []
    for index in range(new):
        target, _ = write(limited, new + 1 + index)
        started = time.perf_counter()
        limited.output.published(target, len(IMAGE), time.time())
        retained.append(time.perf_counter() - started)
    assert limited.output.index.count == count
    assert sum(1 for name in os.listdir(folder) if name.startswith("foreign-")) == count

    files = StreamFiles("snaps", "png")
    rescans = []
    for _ in range(RESCAN_SAMPLES):
        started = time.perf_counter()
        with os.scandir(folder) as entries:
            found = [(e.stat().st_mtime, e.name) for e in entries if files.is_own(e.name)]
        found.sort()
        rescans.append(time.perf_counter() - started)
    return {
        "write": statistics.median(writes),
        "retention": statistics.median(retained),
        "retention_p99": sorted(retained)[int(len(retained) * 0.99) - 1],
        "first_scan": first,
        "rescan": statistics.median(rescans),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.retention")
    parser.add_argument(
        "--files", type=int, default=100_000, help="files of the stream already there"
    )
    parser.add_argument("--small", type=int, default=1_000, help="the same with this many")
    parser.add_argument("--new", type=int, default=2_000, help="new files measured per run")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(environment())
    rows = []
    for count in (args.small, args.files):
        results = []
        for _ in range(args.rounds):
            folder = Path(tempfile.mkdtemp(prefix="bench-retention-"))
            try:
                results.append(run(folder, count, args.new))
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        figures = {key: statistics.median(r[key] for r in results) for key in results[0]}
        rows.append(
            [
                count,
                figures["write"] * 1e6,
                figures["retention"] * 1e6,
                figures["retention_p99"] * 1e6,
                figures["first_scan"] * 1e3,
                figures["rescan"] * 1e6,
                figures["rescan"] / figures["retention"],
            ]
        )
    print(
        table(
            [
                "own files",
                "write us/file",
                "retention us/file",
                "retention p99 us",
                "first scan ms",
                "rescan us/file (before)",
                "rescan / index",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    entry_point(main)
