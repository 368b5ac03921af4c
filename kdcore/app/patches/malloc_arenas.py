"""Fewer glibc malloc arenas for the app process.

glibc gives threads their own heaps ("arenas", up to 8 per core). The app's many short-lived
worker threads (Gradio's request pool, aiortc's codec executors) then scatter small, long-lived
objects over many arenas whose freed pages can no longer be returned: resident memory creeps
up with every new browser session although the Python-level state stays bounded. Two arenas
(the ``MALLOC_ARENA_MAX=2`` advice for threaded Python servers) keep that growth down; set
before the server's threads start. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_ARENA_MAX = -8  # glibc's mallopt parameter number
APP_ARENAS = 2


def limit_malloc_arenas(arenas: int = APP_ARENAS) -> bool:
    """``mallopt(M_ARENA_MAX, arenas)`` unless ``MALLOC_ARENA_MAX`` is set; True when applied."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return False
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    return bool(libc.mallopt(M_ARENA_MAX, arenas))
