"""glibc malloc settings for a long-running process with many connections.

Socket reads allocate and free 256 KiB buffers all the time. glibc raises its mmap threshold after
such frees and then serves them from the heap, which fragments and never shrinks; per-thread arenas
(the IoT SDK and media workers are threads) multiply that. A fixed 128 KiB threshold and two arenas
cut the agent's memory per tunnel by about a fifth (see bench/paced_tunnels.py). Without glibc
this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
THRESHOLD_BYTES = 128 * 1024
ARENAS = 2


def tune_allocator() -> bool:
    """Apply the settings; True if glibc took them. Call before threads start."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    results = [
        mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES),
        mallopt(M_TRIM_THRESHOLD, THRESHOLD_BYTES),
        mallopt(M_ARENA_MAX, ARENAS),
    ]
    return all(result == 1 for result in results)
