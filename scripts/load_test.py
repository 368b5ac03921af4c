"""Bounded load test of the app on loopback (issue 7).

python -m scripts.load_test --clients 8 --calls 200 --out reports/load_test.json

Launches the app in a child process on 127.0.0.1 (a free port), runs CLIENTS gradio_client
clients x CALLS /predict calls from this process plus /analyse_video streaming sessions
meanwhile, then writes p50/p95 latency, errors, the app process's resident-memory growth and
its Grad-CAM hook count to OUT.
With --fresh-sessions every round uses new clients (as a population of browser tabs does):
a warm-up round of --warmup-calls, then --rounds rounds, the app's memory after each.
Exit status 1 when any call failed, memory grew by 50 MB or more, or hooks were left behind.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from kdcore.app.patches.upload_cache import use_private_upload_cache

use_private_upload_cache()  # before Gradio is imported; the app's child process inherits it

from kdcore.app.layout import AppSettings  # noqa: E402
from kdcore.app.service import DEFAULT_CHECKPOINT_DIR  # noqa: E402
from kdcore.config import REPO_ROOT  # noqa: E402
from scripts.live_browser import clip_frames, write_y4m  # noqa: E402
from scripts.loadtest import (  # noqa: E402
    AppProcess,
    LiveLoad,
    free_local_port,
    machine_note,
    run_fresh_sessions_test,
    run_load_test,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8, help="concurrent /predict clients (default: %(default)s)")
    parser.add_argument("--calls", type=int, default=200, help="/predict calls per client (default: %(default)s)")
    parser.add_argument("--warmup-calls", type=int, help="warm-up calls per client (default: calls / 8, at least 2)")
    parser.add_argument("--checkpoints", type=Path, default=DEFAULT_CHECKPOINT_DIR)
    parser.add_argument("--image", type=Path, default=REPO_ROOT / "assets" / "phantom_round_lesion.png")
    parser.add_argument("--clip", type=Path, default=REPO_ROOT / "assets" / "phantom_sweep.mp4")
    parser.add_argument("--no-stream", action="store_true", help="skip the /analyse_video streaming sessions")
    parser.add_argument("--fresh-sessions", action="store_true", help="new client sessions in every round")
    parser.add_argument(
        "--rounds", type=int, default=3, help="--fresh-sessions: measured rounds (default: %(default)s)"
    )
    parser.add_argument(
        "--live-sessions",
        type=int,
        default=0,
        help="--fresh-sessions: Chromium live-tab sessions per round, 5 s each (needs playwright + chromium)",
    )
    parser.add_argument("--out", type=Path, help="JSON report to write")
    args = parser.parse_args(argv)

    settings = AppSettings(checkpoints=args.checkpoints, port=free_local_port())
    with AppProcess(settings) as app:
        clip = None if args.no_stream else args.clip
        if args.fresh_sessions:
            warmup = args.warmup_calls if args.warmup_calls is not None else 10
            live = None
            if args.live_sessions:
                y4m = write_y4m(clip_frames(args.clip), Path(tempfile.mkdtemp()) / "live.y4m")
                live = LiveLoad(y4m, sessions=args.live_sessions)
            report = run_fresh_sessions_test(app, args.image, clip, args.clients, args.calls, args.rounds, warmup, live)
        else:
            report = run_load_test(app, args.image, clip, args.clients, args.calls, args.warmup_calls)
        result = {**report.as_dict(), "queue": app.queue, "machine": machine_note()}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
