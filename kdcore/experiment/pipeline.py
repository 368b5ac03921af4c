"""``train.py all``: the reference protocol, resumable step by step, then the reports."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from kdcore.checkpoint import checkpoint_paths
from kdcore.config import Preset, with_overrides
from kdcore.experiment import benchmark, model_card, reports
from kdcore.experiment.protocol import BusiData, evaluate_checkpoint, load_busi, train_student, train_teacher
from kdcore.experiment.runs import best_by_validation, is_done, student_runs, teacher_candidates, teacher_name
from kdcore.runtime import CPU, Runtime


def train_teachers(preset: Preset, data: BusiData, runs: Path, args: argparse.Namespace, runtime: Runtime) -> Path:
    """Train the preset's teacher and its alternatives; keep the best on validation,
    comparing all of them within the alternatives' epoch budget (same budget for all)."""
    candidates = []
    for cfg, budget in teacher_candidates(preset):
        path = runs / teacher_name(cfg)
        if not is_done(path):
            epochs = args.epochs or budget
            train_cfg = with_overrides(preset.teacher_train, epochs=epochs, seed=args.seed)
            train_teacher(cfg, preset.teacher_preprocess, train_cfg, data, path, resume=True, runtime=runtime)
        candidates.append(path)
    return best_by_validation(candidates, preset.alternative_epochs)


def run_all(preset: Preset, args: argparse.Namespace, runtime: Runtime = CPU) -> None:
    """Teacher(s) -> students (KD and scratch, every seed) -> ship best -> reports (rank 0)."""
    runs = Path(args.runs) / preset.name
    data = load_busi(args.data, args.split_file, args.allow_data_mismatch, args.subset)
    teacher = train_teachers(preset, data, runs, args, runtime)
    if runtime.is_main:
        print(f"teacher selected on validation: {teacher.name}", flush=True)
    seeds = tuple(args.seeds) if args.seeds else preset.seeds
    for run in student_runs(preset, seeds, args.epochs, not args.skip_extra):
        path = runs / run.name
        if not is_done(path):
            train_student(
                run.model,
                preset.student_preprocess,
                run.train,
                data,
                path,
                teacher if run.with_teacher else None,
                resume=True,
                runtime=runtime,
            )
    if runtime.is_main:
        write_reports(preset, args, data)


def ship(teacher: Path, student: Path, ship_dir: Path) -> None:
    """Copy the selected teacher and student into ``ship_dir`` as teacher.* and student.*."""
    ship_dir.mkdir(parents=True, exist_ok=True)
    for source, name in ((teacher, "teacher"), (student, "student")):
        for src, dst in zip(checkpoint_paths(source), checkpoint_paths(ship_dir / name)):
            shutil.copyfile(src, dst)


def write_reports(preset: Preset, args: argparse.Namespace, data: BusiData | None = None) -> None:
    """Select and ship the models, then write every table and figure of reports/."""
    runs = Path(args.runs) / preset.name
    if data is None:
        data = load_busi(args.data, args.split_file, args.allow_data_mismatch, args.subset)
    teachers = [runs / teacher_name(c) for c, _ in teacher_candidates(preset) if is_done(runs / teacher_name(c))]
    teacher = best_by_validation(teachers, preset.alternative_epochs)
    done = [
        r
        for r in student_runs(
            preset, preset.seeds if not getattr(args, "seeds", None) else tuple(args.seeds), args.epochs, True
        )
        if is_done(runs / r.name)
    ]
    # The shipped student is a distilled one (the scratch runs are the ablation it is compared with).
    distilled = [runs / r.name for r in done if r.row == "mobilenetv3_kd"]
    student = best_by_validation(distilled)
    ship_dir, reports_dir = Path(args.ship_dir), Path(args.reports)
    ship(teacher, student, ship_dir)
    efficiency = benchmark.write_benchmark(
        [
            "--out",
            str(reports_dir / "benchmark.json"),
            "--student",
            str(ship_dir / "student"),
            "--teacher",
            str(ship_dir / "teacher"),
            "--data",
            str(args.data),
            "--split-file",
            str(args.split_file),
        ]
        + (["--quick"] if args.subset else [])
    )
    context = {
        "cross_validation": cross_validation_results(preset, reports_dir / "cv"),
        "external": {} if args.subset else external_results(ship_dir, args.external, args.split_file, reports_dir),
    }
    summary = reports.build(
        data, runs, teachers, preset.alternative_epochs, teacher, student, done, reports_dir, efficiency, context
    )  # fmt: skip
    model_card.write_model_card(summary, ship_dir / "MODEL_CARD.md", teacher, student)


def cross_validation_results(preset: Preset, cv_dir: Path) -> dict[str, dict[str, Any]]:
    """Report row -> the CV result (train+val folds) of the recipe it was trained with."""
    files = {row: cv_dir / f"{name}.json" for row, name in preset.cv_runs}
    return {row: json.loads(path.read_text()) for row, path in files.items() if path.is_file()}


def external_results(ship_dir: Path, folder: Path | None, split_file: Path, reports_dir: Path) -> dict[str, Any]:
    """The shipped models scored on an external class folder (another hospital; never trained
    or tuned on), each at its stored operating point; nothing when there is no such folder."""
    if folder is None or not Path(folder).is_dir():
        return {}
    out = reports_dir / "external"
    return {
        role: evaluate_checkpoint(ship_dir / role, folder, split_file, out / f"{Path(folder).name}_{role}.json")
        for role in ("teacher", "student")
    }
