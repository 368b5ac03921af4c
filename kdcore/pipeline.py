"""``train.py all``: the reference protocol, resumable step by step, then the reports."""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass
from pathlib import Path

from kdcore.checkpoint import checkpoint_paths, read_checkpoint_config
from kdcore.config import ModelConfig, Preset, TrainConfig, with_overrides
from kdcore.protocol import BusiData, load_busi, train_student, train_teacher


@dataclass(frozen=True)
class StudentRun:
    """One student training run of the protocol."""

    row: str  # table row, e.g. "mobilenetv3_kd"
    model: ModelConfig
    train: TrainConfig
    with_teacher: bool
    seed: int

    @property
    def name(self) -> str:
        return f"{self.row}_s{self.seed}"


def teacher_name(cfg: ModelConfig) -> str:
    return f"teacher_{cfg.global_branch}"


def student_runs(preset: Preset, seeds: tuple[int, ...], epochs: int | None, include_extra: bool) -> list[StudentRun]:
    """KD and scratch runs of the student and the extra (EfficientNet-Lite0) student, per seed."""
    rows = [("mobilenetv3", preset.student, preset.student_train)]
    if include_extra and preset.extra_student is not None:
        rows.append(("efficientnet_lite0", preset.extra_student, preset.extra_student_train or preset.student_train))
    return [
        StudentRun(
            f"{prefix}_{'kd' if kd else 'scratch'}", model, with_overrides(train, seed=seed, epochs=epochs), kd, seed
        )
        for seed in seeds  # seed-major order: an interrupted run still has every row
        for prefix, model, train in rows
        for kd in (True, False)
    ]


def _done(path: Path) -> bool:
    return all(p.is_file() for p in checkpoint_paths(path))


def validation_score(path: Path, within_epochs: int = 0) -> tuple[float, float]:
    """Best (val balanced accuracy, -val loss) of a run, optionally within its first epochs."""
    history = read_checkpoint_config(path)["history"]
    rows = [h for h in history if not within_epochs or h["epoch"] <= within_epochs]
    return max((h["val_balanced_accuracy"], -h["val_loss"]) for h in rows)


def best_by_validation(paths: list[Path], within_epochs: int = 0) -> Path:
    """The checkpoint with the highest validation balanced accuracy (then lowest val loss)."""
    return max(paths, key=lambda p: validation_score(p, within_epochs))


def teacher_candidates(preset: Preset) -> list[tuple[ModelConfig, int | None]]:
    """(config, epochs override) of the preset's teacher and its alternatives."""
    budget = preset.alternative_epochs or None
    return [(preset.teacher, None)] + [(cfg, budget) for cfg in preset.teacher_alternatives]


def train_teachers(preset: Preset, data: BusiData, runs: Path, args: argparse.Namespace) -> Path:
    """Train the preset's teacher and its alternatives; keep the best on validation,
    comparing all of them within the alternatives' epoch budget (same budget for all)."""
    candidates = []
    for cfg, budget in teacher_candidates(preset):
        path = runs / teacher_name(cfg)
        if not _done(path):
            epochs = args.epochs or budget
            train_cfg = with_overrides(preset.teacher_train, epochs=epochs, seed=args.seed)
            train_teacher(cfg, preset.teacher_preprocess, train_cfg, data, path, resume=True)
        candidates.append(path)
    return best_by_validation(candidates, preset.alternative_epochs)


def run_all(preset: Preset, args: argparse.Namespace) -> None:
    """Teacher(s) -> students (KD and scratch, every seed) -> ship best -> reports."""
    runs = Path(args.runs) / preset.name
    data = load_busi(args.data, args.split_file, args.allow_data_mismatch, args.subset)
    teacher = train_teachers(preset, data, runs, args)
    print(f"teacher selected on validation: {teacher.name}", flush=True)
    seeds = tuple(args.seeds) if args.seeds else preset.seeds
    for run in student_runs(preset, seeds, args.epochs, not args.skip_extra):
        path = runs / run.name
        if not _done(path):
            train_student(
                run.model,
                preset.student_preprocess,
                run.train,
                data,
                path,
                teacher if run.with_teacher else None,
                resume=True,
            )
    write_reports(preset, args, data)


def ship(teacher: Path, student: Path, ship_dir: Path) -> None:
    """Copy the selected teacher and student into ``ship_dir`` as teacher.* and student.*."""
    ship_dir.mkdir(parents=True, exist_ok=True)
    for source, name in ((teacher, "teacher"), (student, "student")):
        for src, dst in zip(checkpoint_paths(source), checkpoint_paths(ship_dir / name)):
            shutil.copyfile(src, dst)


def write_reports(preset: Preset, args: argparse.Namespace, data: BusiData | None = None) -> None:
    """Select and ship the models, then write every table and figure of reports/."""
    from kdcore import reports

    runs = Path(args.runs) / preset.name
    if data is None:
        data = load_busi(args.data, args.split_file, args.allow_data_mismatch, args.subset)
    teachers = [runs / teacher_name(c) for c, _ in teacher_candidates(preset) if _done(runs / teacher_name(c))]
    teacher = best_by_validation(teachers, preset.alternative_epochs)
    done = [
        r
        for r in student_runs(
            preset, preset.seeds if not getattr(args, "seeds", None) else tuple(args.seeds), args.epochs, True
        )
        if _done(runs / r.name)
    ]
    mobilenets = [runs / r.name for r in done if r.row.startswith("mobilenetv3")]
    student = best_by_validation(mobilenets)
    ship(teacher, student, Path(args.ship_dir))
    reports.build(
        data, runs, teachers, preset.alternative_epochs, teacher, student, done, Path(args.reports), Path(args.ship_dir)
    )
