"""Clinician app: teacher vs student on images, a live stream and cine loops.

python app.py [--host 127.0.0.1] [--port 7860] [--checkpoints DIR] [--examples-dir DIR]
`gradio app.py` also works (it picks up the module-level ``demo``, with default settings).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from kdcore.app.patches.upload_cache import use_private_upload_cache

use_private_upload_cache()  # before Gradio is imported

from kdcore.app.layout import AppSettings, build_demo, launch_options  # noqa: E402


def parse_settings(argv: list[str]) -> AppSettings:
    defaults = AppSettings()
    parser = argparse.ArgumentParser(description="Breast-ultrasound KD demo (research use only).")
    parser.add_argument("--host", default=defaults.host, help="interface to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=defaults.port, help="port (default: %(default)s)")
    parser.add_argument(
        "--checkpoints", type=Path, default=defaults.checkpoints, help="folder with teacher.* and student.*"
    )
    parser.add_argument("--examples-dir", type=Path, help="extra folder of example images / clips")
    args = parser.parse_args(argv)
    return AppSettings(checkpoints=args.checkpoints, examples_dir=args.examples_dir, host=args.host, port=args.port)


settings = parse_settings(sys.argv[1:] if __name__ == "__main__" else [])
demo = build_demo(settings)

if __name__ == "__main__":
    # Stop on SIGTERM as on Ctrl-C: Gradio empties its cache, then the private upload folder goes.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    demo.launch(**launch_options(settings))
