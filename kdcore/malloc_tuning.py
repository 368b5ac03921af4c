"""glibc malloc settings for our two kinds of process; elsewhere than glibc they do nothing.

The app: glibc gives threads their own heaps ("arenas", up to 8 per core). The app's many
short-lived worker threads (Gradio's request pool, aiortc's codec executors) then scatter small,
long-lived objects over many arenas whose freed pages can no longer be returned: resident memory
creeps up with every new browser session although the Python-level state stays bounded. Two
arenas (the ``MALLOC_ARENA_MAX=2`` advice for threaded Python servers) keep that growth down;
set before the server's threads start.

Training: a batch of views through a CNN makes activations larger than glibc's mmap threshold
(at most 32 MB), so every layer's output is a fresh ``mmap`` that the kernel zero-fills page by
page, and every free an ``munmap``. Measured on the teacher-output pass (two EfficientNets at
260 px, batches of 16, one core, the other core busy): 1.7 views/s with 11 s of every 24 s in
the kernel; with freed memory kept in the heap, 3.2 views/s and 0.2 s in the kernel. Batches
must stay small enough that what they free stays below the trim threshold (2 GB). The process
keeps its peak memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# glibc's mallopt parameter numbers
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
APP_ARENAS = 2
NEVER_TRIM = 2**31 - 1  # bytes free at the heap top before glibc gives them back (mallopt takes an int)


def _mallopt(param: int, value: int, env_name: str) -> bool:
    """``mallopt(param, value)`` unless the user set ``env_name``; True when applied."""
    if os.environ.get(env_name):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return False
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    return bool(libc.mallopt(param, value))


def limit_malloc_arenas(arenas: int = APP_ARENAS) -> bool:
    """``mallopt(M_ARENA_MAX, arenas)`` unless ``MALLOC_ARENA_MAX`` is set; True when applied."""
    return _mallopt(M_ARENA_MAX, arenas, "MALLOC_ARENA_MAX")


def keep_freed_memory() -> bool:
    """Large blocks from the heap, never ``mmap``, and the heap not trimmed below 2 GB free (unless
    ``MALLOC_MMAP_MAX_`` / ``MALLOC_TRIM_THRESHOLD_`` are set); True when both applied."""
    no_mmap = _mallopt(M_MMAP_MAX, 0, "MALLOC_MMAP_MAX_")
    return _mallopt(M_TRIM_THRESHOLD, NEVER_TRIM, "MALLOC_TRIM_THRESHOLD_") and no_mmap
