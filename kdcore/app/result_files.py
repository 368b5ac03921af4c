"""Files the app writes for users to download (per-frame CSV, reports): in a folder of the
process's private upload cache, the oldest removed beyond a fixed number, so a long-running
app never fills the disk. Gradio copies a returned file into its own cache (which it sweeps);
our original is removed here once newer ones have replaced it."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

KEEP_RESULT_FILES = 64


def result_folder() -> Path:
    """``kd-results/`` in the app's upload cache (``GRADIO_TEMP_DIR``), else the system temp folder."""
    folder = Path(os.environ.get("GRADIO_TEMP_DIR") or tempfile.gettempdir()) / "kd-results"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder


def new_result_path(stem: str, suffix: str, keep: int = KEEP_RESULT_FILES) -> Path:
    """A fresh path ``<stem>-<id><suffix>`` (in its own sub-folder, so the user sees ``stem``);
    folders beyond the ``keep`` newest are deleted first."""
    folder = result_folder()
    existing = sorted(folder.iterdir(), key=lambda p: p.stat().st_mtime)
    for old in existing[: max(0, len(existing) - keep + 1)]:
        shutil.rmtree(old, ignore_errors=True)
    own = folder / uuid.uuid4().hex
    own.mkdir(mode=0o700)
    safe_stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:80] or "result"
    return own / f"{safe_stem}{suffix}"
