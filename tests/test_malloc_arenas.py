"""The app limits glibc's malloc arenas: many threads share two heaps instead of one each."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

ARENA_COUNT = textwrap.dedent(
    """
    import ctypes, os, sys, tempfile, threading
    from kdcore.app.patches.malloc_arenas import limit_malloc_arenas
    os.environ.pop("MALLOC_ARENA_MAX", None)
    applied = limit_malloc_arenas() if sys.argv[1] == "limit" else False
    start = threading.Barrier(8)
    def work():
        start.wait()  # all threads allocate at once: glibc hands contended threads new arenas
        blocks = [bytearray(256) for _ in range(20000)]
        start.wait()
    threads = [threading.Thread(target=work) for _ in range(8)]
    [t.start() for t in threads]; [t.join() for t in threads]
    libc = ctypes.CDLL(None)
    libc.fdopen.restype = ctypes.c_void_p
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    with tempfile.TemporaryFile("w+") as f:
        stream = libc.fdopen(os.dup(f.fileno()), b"w")
        libc.malloc_info(0, stream); libc.fclose(stream)
        f.seek(0); text = f.read()
    print(applied, text.count("<heap nr="))
    """
)


def _arenas(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", ARENA_COUNT, mode], capture_output=True, text=True, check=True)
    applied, heaps = out.stdout.split()
    return applied, int(heaps)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_threads_share_two_arenas_once_limited():
    applied, limited = _arenas("limit")
    _, default = _arenas("default")
    assert applied == "True"
    assert limited <= 2
    assert default > 2  # without the limit the same threads spread over more heaps


def test_a_user_setting_wins(monkeypatch):
    from kdcore.app.patches.malloc_arenas import limit_malloc_arenas

    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False
