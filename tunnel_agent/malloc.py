"""glibc's allocator set for a long-running agent with many threads and large media buffers.

Two glibc defaults cost a small gateway tens of MiB:

* an arena per thread that allocates (up to 8 per core): the IoT SDK's threads, each camera's
  source and task threads and FFmpeg's codec threads each keep what they freed in their own arena;
* a moving mmap threshold: once a large block is freed (a decoded 1080p frame is 3 MiB), glibc
  raises the threshold (up to 32 MiB), so the next frames come from the heap, where the freed ones
  stay resident instead of going back to the system. A fixed threshold keeps them out (with the
  trim threshold set beside it, as glibc's own moving one is).

The agent sets both itself, before it starts any thread, so every way of starting it (systemd,
Docker, a shell) gets them. ``MALLOC_ARENA_MAX``, ``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_`` or the same parameters in ``GLIBC_TUNABLES`` win: glibc reads them
at start and the agent then leaves that parameter alone. Elsewhere than glibc (musl, macOS)
nothing is changed.
"""

from __future__ import annotations

import ctypes
import os
import re
import tempfile
from dataclasses import dataclass

ARENA_MAX = 2
# Above the tunnels' reads (asyncio reads up to 256 KiB into a new bytes object each time: below
# the threshold, those come from the heap, not from an mmap and its page faults per read), below
# a decoded picture's planes (a 1080p luma plane is 2 MiB).
MMAP_THRESHOLD_BYTES = 1024 * 1024
# Setting the mmap threshold stops glibc moving the trim threshold too (it keeps it at twice the
# mmap threshold), which would leave it at 128 KiB: every 256 KiB read freed at the top of the
# heap would hand its pages back, to fault them in again on the next read. Twice, as glibc does.
TRIM_THRESHOLD_BYTES = 2 * MMAP_THRESHOLD_BYTES
# mallopt parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
# Where a user may have set each parameter already: a variable of its own, or GLIBC_TUNABLES.
ENVIRONMENT = {
    "arena_max": ("MALLOC_ARENA_MAX", "glibc.malloc.arena_max="),
    "mmap_threshold_bytes": ("MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold="),
    "trim_threshold_bytes": ("MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold="),
}


@dataclass(frozen=True)
class MallocSettings:
    """What this process asked of glibc; ``None`` where the environment (or no glibc) decides."""

    arena_max: int | None = None
    mmap_threshold_bytes: int | None = None
    trim_threshold_bytes: int | None = None


class _Process:
    """What ``tune`` set in this process (one per process, as glibc's settings are)."""

    applied = MallocSettings()


def _glibc() -> ctypes.CDLL | None:
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    return libc


def tune(
    arena_max: int = ARENA_MAX,
    mmap_threshold_bytes: int = MMAP_THRESHOLD_BYTES,
    trim_threshold_bytes: int = TRIM_THRESHOLD_BYTES,
) -> MallocSettings:
    """Apply the limits (once, early: arenas that already exist stay) and return what was set."""
    libc = _glibc()
    if libc is None:
        return _Process.applied
    wanted = {
        "arena_max": (M_ARENA_MAX, arena_max),
        "mmap_threshold_bytes": (M_MMAP_THRESHOLD, mmap_threshold_bytes),
        "trim_threshold_bytes": (M_TRIM_THRESHOLD, trim_threshold_bytes),
    }
    applied: dict[str, int] = {}
    for name, (parameter, value) in wanted.items():
        variable, tunable = ENVIRONMENT[name]
        if variable in os.environ or tunable in os.environ.get("GLIBC_TUNABLES", ""):
            continue
        if libc.mallopt(ctypes.c_int(parameter), ctypes.c_int(value)) == 1:
            applied[name] = value
    _Process.applied = MallocSettings(**applied)
    return _Process.applied


def applied() -> MallocSettings:
    return _Process.applied


def arena_count() -> int | None:
    """How many malloc arenas this process has now (glibc's ``malloc_info``); None elsewhere."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "malloc_info"):
        return None
    libc.fdopen.restype = ctypes.c_void_p
    libc.fdopen.argtypes = [ctypes.c_int, ctypes.c_char_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    with tempfile.TemporaryFile() as report:
        stream = libc.fdopen(os.dup(report.fileno()), b"w")
        if not stream:
            return None
        libc.malloc_info(0, stream)
        libc.fclose(stream)
        report.seek(0)
        return len(re.findall(rb"<heap nr=", report.read()))


def release_free_memory() -> None:
    """Hand the free pages of every arena back to the system (after a burst of start-up work)."""
    libc = _glibc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(ctypes.c_size_t(0))
