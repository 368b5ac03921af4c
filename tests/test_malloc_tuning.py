"""glibc malloc settings: the app's threads share two heaps instead of one each; training keeps
freed memory instead of mapping and zero-filling every large block anew."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

ARENA_COUNT = textwrap.dedent(
    """
    import ctypes, os, sys, tempfile, threading
    from kdcore.malloc_tuning import limit_malloc_arenas
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


def _measured(script: str, mode: str) -> tuple[str, int]:
    """(whether the setting was applied, the count the script prints) from a fresh process."""
    out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True)
    applied, count = out.stdout.split()
    return applied, int(count)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_threads_share_two_arenas_once_limited():
    applied, limited = _measured(ARENA_COUNT, "limit")
    _, default = _measured(ARENA_COUNT, "default")
    assert applied == "True"
    assert limited <= 2
    assert default > 2  # without the limit the same threads spread over more heaps


def test_a_user_setting_wins(monkeypatch):
    from kdcore.malloc_tuning import limit_malloc_arenas

    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False


PAGE_FAULTS = textwrap.dedent(
    """
    import os, resource, sys
    from kdcore.malloc_tuning import keep_freed_memory
    for name in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_"):
        os.environ.pop(name, None)
    applied = keep_freed_memory() if sys.argv[1] == "keep" else False
    import torch
    torch.set_num_threads(1)
    conv = torch.nn.Conv2d
    net = torch.nn.Sequential(conv(8, 16, 3, padding=1), torch.nn.ReLU(), conv(16, 8, 3, padding=1))
    x = torch.randn(8, 8, 384, 384)  # 38 MB in, 75 MB in the middle: above any mmap threshold glibc allows
    with torch.no_grad():
        for _ in range(2):  # warm-up: the heap grows to its working size
            net(x)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):  # what a teacher-output pass does, batch after batch
            net(x)
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_training_reuses_freed_memory_instead_of_faulting_it_in_again():
    applied, kept = _measured(PAGE_FAULTS, "keep")
    _, default = _measured(PAGE_FAULTS, "default")
    assert applied == "True"
    assert default > 10 * 18_000  # each 75 MB activation mapped and zero-filled again (18,432 pages)
    # Kept: the heap settles within a pass or two (measured 0, once 36,864 = two activations
    # after a single warm-up pass), never a fault-in per pass as by default.
    assert kept < 3 * 18_432


def test_user_settings_win(monkeypatch):
    from kdcore.malloc_tuning import keep_freed_memory

    monkeypatch.setenv("MALLOC_MMAP_MAX_", "65536")
    assert keep_freed_memory() is False
