"""A private upload cache for each app process.

Gradio's default cache, ``/tmp/gradio``, is shared by every Gradio app on the machine: uploads
of the same file land on the same path, and each app's ``delete_cache`` sweep deletes the
others' files. Ours lives in a fresh folder only this user can read (patient images), removed
when the process exits. Call before Gradio is imported: some of its defaults read
``GRADIO_TEMP_DIR`` at import time.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path


def use_private_upload_cache() -> Path:
    """Point ``GRADIO_TEMP_DIR`` at a new private folder, unless the user chose one already."""
    if not os.environ.get("GRADIO_TEMP_DIR"):
        folder = tempfile.mkdtemp(prefix="kd-demo-uploads-")  # mode 0700
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        os.environ["GRADIO_TEMP_DIR"] = folder
    return Path(os.environ["GRADIO_TEMP_DIR"])
