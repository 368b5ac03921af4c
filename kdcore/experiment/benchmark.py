"""Size / latency / FPS of the teachers, the student's PyTorch and ONNX (fp32, INT8) forms and
the whole live-frame pipeline, next to the paper's own figures; JSON + Markdown out.

python -m kdcore.experiment.benchmark --out reports/benchmark.json       # >= 200 timed runs per row
python -m kdcore.experiment.benchmark --out /tmp/benchmark.json --quick  # a few runs (tests)

The live row times exactly what the app's live handler runs per frame: ``LiveSession.process``
(ROI, student + forward-pass Grad-CAM, smoothing, overlay, status bar) and the JPEG encoding.

Batch 1, warm-up then timed runs, median and p90. The paper-architecture teacher (ViT-B/16 +
ConvNeXt-T) always has random weights (timing only) and, being ~100x slower, gets
``--teacher-runs`` runs. Latency is only meaningful on an otherwise idle machine: the JSON
records the load average before and after, and the thread settings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from kdcore.app.live_session import LiveSession, RegionOfInterest
from kdcore.cam_predictor import GradCamPredictor, load_cam_predictor
from kdcore.checkpoint import CheckpointMeta, checkpoint_paths, load_checkpoint, save_checkpoint
from kdcore.config import CLASS_NAMES, DEFAULT_DATA_DIR, DEFAULT_SPLIT_FILE, OFFLINE, PAPER, REPO_ROOT
from kdcore.export import export_checkpoint, file_mb, split_images
from kdcore.imaging import grey_from_bgr
from kdcore.inference import load_predictor
from kdcore.models import build_model, count_parameters
from kdcore.onnx_runtime import INPUT_NAME, onnx_session
from kdcore.overlay import encode_jpeg
from kdcore.transforms import Preprocess

FRAME_HEIGHT, FRAME_WIDTH = 480, 640
IDLE_LOAD_PER_CPU = 0.25  # 1-minute load average per CPU above which timings are flagged
PAPER_TEACHER_MS = 242.9
PAPER_REFERENCE_ROWS = (
    {"name": "paper: teacher ViT-B/16 + ConvNeXt-T (reported)", "size_mb": 438.8, "median_ms": PAPER_TEACHER_MS},
    {"name": "paper: student MobileNetV3 (reported)", "size_mb": 5.9, "median_ms": 16.3},
)


def time_calls(call: Callable[[], object], warmup: int, runs: int) -> dict[str, float]:
    """Median and p90 wall time in ms of ``runs`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    median = statistics.median(times)
    return {"median_ms": median, "p90_ms": float(np.percentile(times, 90)), "fps": 1000 / median, "runs": runs}


def model_mb(model: nn.Module) -> float:
    """fp32 size of parameters and buffers, in MB of 2**20 bytes (the paper's unit)."""
    return sum(t.numel() * 4 for t in model.state_dict().values() if t.is_floating_point()) / 2**20


def torch_forward(model: nn.Module, batch: torch.Tensor) -> Callable[[], object]:
    @torch.inference_mode()
    def call() -> torch.Tensor:
        return model(batch)

    return call


def student_checkpoint(path: Path, folder: Path) -> tuple[Path, str]:
    """The trained student if ``path`` exists, else a random-weight one saved into ``folder``."""
    if checkpoint_paths(path)[0].is_file():
        return path, f"trained ({path})"
    model = build_model(OFFLINE.student).eval()
    meta = CheckpointMeta(OFFLINE.student, OFFLINE.student_preprocess, CLASS_NAMES, role="student")
    saved = save_checkpoint(folder / "student", model, meta)
    return saved, "random weights (no trained checkpoint found)"


def offline_teacher(path: Path) -> tuple[nn.Module, Preprocess, str, str]:
    """(model, its own preprocessing, where its weights came from, architecture name)."""
    if checkpoint_paths(path)[0].is_file():
        model, meta = load_checkpoint(path)
        return model, Preprocess(meta.preprocess), f"trained ({path})", meta.architecture
    cfg, preprocess = replace(OFFLINE.teacher, cnn_init="none"), OFFLINE.teacher_preprocess
    architecture = CheckpointMeta(cfg, preprocess, CLASS_NAMES).architecture
    model = build_model(cfg, preprocess.input_size).eval()
    return model, Preprocess(preprocess), "random weights (no trained checkpoint found)", architecture


def paper_teacher_model() -> nn.Module:
    """The paper's ViT-B/16 + ConvNeXt-T teacher with random weights (timing only)."""
    return build_model(replace(PAPER.teacher, cnn_init="none", vit_init="none")).eval()


def benchmark_frame(data_dir: Path, split_file: Path, count: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """A 640x480 BGR camera frame and ``count`` grey training images for INT8 calibration: BUSI
    if present, else synthetic speckle."""
    if split_file.is_file() and (data_dir / "manifest.csv").is_file():
        greys, _ = split_images(data_dir, split_file, "train", count)
    else:
        rng = np.random.default_rng(0)
        greys = [np.clip(rng.rayleigh(60, (300, 400)), 0, 255).astype(np.uint8) for _ in range(count)]
    frame = cv2.cvtColor(cv2.resize(greys[0], (FRAME_WIDTH, FRAME_HEIGHT)), cv2.COLOR_GRAY2BGR)
    return frame, greys


def row(name: str, size_mb: float, params: int, timing: dict[str, float]) -> dict[str, Any]:
    return {"name": name, "size_mb": round(size_mb, 3), "params": params, **timing}


def torch_row(name: str, model: nn.Module, call: Callable[[], object], warmup: int, runs: int) -> dict[str, Any]:
    return row(name, model_mb(model), count_parameters(model), time_calls(call, warmup, runs))


def measured_rows(args: argparse.Namespace, workdir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every timed row, plus the export report and which weights each row used."""
    warmup, runs = args.warmup, args.runs
    frame, greys = benchmark_frame(args.data, args.split_file, args.calibration_images)
    grey = grey_from_bgr(frame)
    student_path, student_source = student_checkpoint(args.student, workdir)
    predictor = load_predictor(student_path)
    batch = predictor.preprocess(grey).unsqueeze(0)
    small = predictor.preprocess.resize(grey).unsqueeze(0)

    paper_teacher = paper_teacher_model()
    rows = [
        torch_row(
            "teacher, paper architecture (ViT-B/16 + ConvNeXt-T), PyTorch",
            paper_teacher,
            torch_forward(paper_teacher, batch),
            min(warmup, 3),
            args.teacher_runs,
        )
    ]
    del paper_teacher  # ~440 MB
    teacher, teacher_preprocess, teacher_source, architecture = offline_teacher(args.teacher)
    rows.append(
        torch_row(
            f"teacher, offline ({architecture}, {teacher_preprocess.cfg.input_size} px), PyTorch",
            teacher,
            torch_forward(teacher, teacher_preprocess(grey).unsqueeze(0)),
            warmup,
            runs,
        )
    )
    student = predictor.model
    rows.append(torch_row("student, PyTorch eager", student, torch_forward(student, batch), warmup, runs))
    reference_cam = GradCamPredictor(predictor)
    rows.append(
        torch_row(
            "student, PyTorch + pytorch-grad-cam (preprocess + forward + backward CAM)",
            student,
            lambda: reference_cam.predict_with_cam(grey),
            warmup,
            runs,
        )
    )

    export = export_checkpoint(student_path, greys, out_dir=workdir / "onnx")
    params = count_parameters(student)
    feed = {INPUT_NAME: small.numpy()}
    for label, key in (("fp32", "onnx"), ("INT8", "int8_onnx")):
        session = onnx_session(export[key], args.threads)
        timing = time_calls(lambda session=session: session.run(None, feed), warmup, runs)
        rows.append(
            row(f"student, ONNX Runtime {label} (normalise + logits + CAM)", file_mb(export[key]), params, timing)
        )
    live = load_cam_predictor(student_path, "onnxruntime", threads=args.threads)
    session = LiveSession()
    rows.append(
        row(
            "live frame, as the app's live handler: 640x480 BGR -> LiveSession.process (ONNX fp32 student + CAM, "
            "smoothing, overlay, status bar) -> JPEG",
            file_mb(export["onnx"]),
            params,
            time_calls(
                lambda: encode_jpeg(session.process(live, frame, RegionOfInterest(), 0.6, 0.4).frame_bgr), warmup, runs
            ),
        )
    )
    weights = {"student": student_source, "offline_teacher": teacher_source, "paper_teacher": "random weights"}
    return rows, {"export": export, "weights": weights}


def with_speedups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Measured rows get a speed-up vs the measured paper-architecture teacher (the first row);
    the paper's reported rows vs its reported teacher."""
    teacher_ms = rows[0]["median_ms"]
    measured = [{**r, "speedup_vs_paper_teacher": teacher_ms / r["median_ms"]} for r in rows]
    reported = [
        {"params": None, "p90_ms": None, "fps": 1000 / r["median_ms"], "runs": None, **r}
        | {"speedup_vs_paper_teacher": PAPER_TEACHER_MS / r["median_ms"]}
        for r in PAPER_REFERENCE_ROWS
    ]
    return measured + reported


def thread_settings(threads: int | None) -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "onnxruntime_intra_op_threads": threads if threads is not None else "onnxruntime default (0)",
    }


def markdown_table(result: dict[str, Any]) -> str:
    """The rows as a Markdown table with a short header on how they were measured."""
    threads = result["threads"]
    weights = "; ".join(f"{k}: {v}" for k, v in result["weights"].items())
    lines = [
        "# Latency benchmark (CPU, batch 1)",
        "",
        f"Measured {result['measured_at']} on {result['machine']['processor']} ({threads['cpu_count']} CPUs); "
        f"threads: torch {threads['torch_num_threads']}, onnxruntime {threads['onnxruntime_intra_op_threads']}; "
        f"load average before / after: {result['load_average_before']} / {result['load_average_after']}.",
        f"Weights: {weights}.",
        "Sizes in MB of 2^20 bytes (fp32 tensors for PyTorch rows, file size for ONNX rows).",
        *(
            ["", "**Provisional**: the machine was busy when measured; rerun on an idle machine."]
            * result["provisional"]
        ),
        "",
        "| model | size MB | params | median ms | p90 ms | FPS | speed-up vs paper-arch teacher | runs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        cells = [
            r["name"],
            f"{r['size_mb']:.2f}",
            f"{r['params'] / 1e6:.2f} M" if r["params"] else "-",
            f"{r['median_ms']:.2f}",
            f"{r['p90_ms']:.2f}" if r["p90_ms"] is not None else "-",
            f"{r['fps']:.1f}",
            f"{r['speedup_vs_paper_teacher']:.0f}x",
            str(r["runs"] or "-"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    busy = load_before[0] > IDLE_LOAD_PER_CPU * (os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        rows, details = measured_rows(args, Path(tmp))
    for report_key in ("onnx", "int8_onnx"):
        details["export"].pop(report_key)  # temporary paths
    return {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"processor": platform.processor() or platform.machine(), "python": platform.python_version()},
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
        "threads": thread_settings(args.threads),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "provisional": busy,  # other work was running: rerun on an idle machine for final numbers
        "warmup": args.warmup,
        **details,
        "rows": with_speedups(rows),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    checkpoints = REPO_ROOT / "checkpoints"
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "reports" / "benchmark.json", help="JSON to write")
    parser.add_argument("--student", type=Path, default=checkpoints / "student", help="student checkpoint")
    parser.add_argument("--teacher", type=Path, default=checkpoints / "teacher", help="offline teacher checkpoint")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR, help="BUSI (frame + INT8 calibration)")
    parser.add_argument("--split-file", type=Path, default=DEFAULT_SPLIT_FILE)
    parser.add_argument("--runs", type=int, default=200, help="timed runs per row")
    parser.add_argument("--teacher-runs", type=int, default=30, help="timed runs of the paper-architecture teacher")
    parser.add_argument("--warmup", type=int, default=20, help="untimed runs before timing")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and onnxruntime intra-op threads")
    parser.add_argument("--calibration-images", type=int, default=64, help="BUSI training images for INT8")
    parser.add_argument("--quick", action="store_true", help="3 runs per row, 1 warm-up, 4 calibration images")
    return parser


def write_benchmark(argv: list[str]) -> dict[str, Any]:
    """Run the benchmark with command-line ``argv``; write OUT.json and OUT.md; return the result."""
    args = build_parser().parse_args(argv)
    if args.quick:
        args.runs, args.teacher_runs, args.warmup, args.calibration_images = 3, 1, 1, 4
    result = run_benchmark(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown_table(result))
    return result


def main(argv: list[str] | None = None) -> int:
    result = write_benchmark(sys.argv[1:] if argv is None else argv)
    print(markdown_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
