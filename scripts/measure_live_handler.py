"""Time the live handler: one 640x480 BGR frame in -> annotated overlay JPEG out (Grad-CAM included).

python scripts/measure_live_handler.py [--checkpoint checkpoints/student] [--runs 200]
Without a shipped student checkpoint it measures a random-weight MobileNetV3-Small of the
same architecture (same cost). Frames come from --clip (default: the synthetic demo clip).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kdcore.explain import encode_jpeg  # noqa: E402
from kdcore.live import load_cam_predictor  # noqa: E402
from kdcore.live_session import LiveSession, RegionOfInterest  # noqa: E402


def random_student(folder: Path) -> Path:
    """A random-weight student with the offline preset's architecture and preprocessing."""
    import torch

    from kdcore.checkpoint import save_checkpoint
    from kdcore.config import CLASS_NAMES, OFFLINE
    from kdcore.models import build_model

    torch.manual_seed(0)
    model = build_model(OFFLINE.student).eval()
    return save_checkpoint(folder / "student", model, OFFLINE.student, OFFLINE.student_preprocess, CLASS_NAMES)


def frames_640x480(clip: Path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(clip))
    frames = []
    while (ok_frame := capture.read())[0]:
        frames.append(cv2.resize(ok_frame[1], (640, 480)))
    capture.release()
    if not frames:
        raise SystemExit(f"no frames decoded from {clip}")
    return frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "student.safetensors")
    parser.add_argument("--clip", type=Path, default=ROOT / "assets" / "phantom_sweep.mp4")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint if args.checkpoint.is_file() else random_student(Path(tmp))
        cam_predictor = load_cam_predictor(checkpoint)
    frames = frames_640x480(args.clip)
    session, roi = LiveSession(), RegionOfInterest()
    timings = []
    for i in range(args.warmup + args.runs):
        started = time.perf_counter()
        result = session.process(cam_predictor, frames[i % len(frames)], roi, smoothing=0.6, opacity=0.4)
        encode_jpeg(result.frame_bgr)
        if i >= args.warmup:
            timings.append((time.perf_counter() - started) * 1000)
    median, p90 = np.percentile(timings, [50, 90])
    source = "shipped checkpoint" if checkpoint == args.checkpoint else "random-weight student (no checkpoint)"
    print(f"live handler, 640x480 BGR -> overlay JPEG, CAM backend {cam_predictor.backend}, {source}")
    print(f"runs {len(timings)}: median {median:.1f} ms, p90 {p90:.1f} ms, mean {np.mean(timings):.1f} ms")
    print("target: median <= 20 ms:", "PASS" if median <= 20 else "MISS")


if __name__ == "__main__":
    main()
