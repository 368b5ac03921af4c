"""The runs of the reference protocol: their names, the student rows, and selection on validation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kdcore.checkpoint import CheckpointMeta, checkpoint_paths
from kdcore.config import ModelConfig, Preset, TrainConfig, extra_student_recipe, scratch_recipe, with_overrides


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
    """``teacher_ensemble`` for a feature ensemble, else ``teacher_<global branch>``."""
    return "teacher_ensemble" if cfg.kind == "ensemble" else f"teacher_{cfg.global_branch}"


def student_runs(preset: Preset, seeds: tuple[int, ...], epochs: int | None, include_extra: bool) -> list[StudentRun]:
    """KD and scratch runs of the student and the extra (EfficientNet-Lite0) student, per seed."""
    rows = [("mobilenetv3", preset.student, preset.student_train, scratch_recipe(preset))]
    if include_extra and preset.extra_student is not None:
        extra_train = extra_student_recipe(preset)
        rows.append(("efficientnet_lite0", preset.extra_student, extra_train, extra_train))
    return [
        StudentRun(
            f"{prefix}_{'kd' if kd else 'scratch'}",
            model,
            with_overrides(kd_train if kd else scratch_train, seed=seed, epochs=epochs),
            kd,
            seed,
        )
        for seed in seeds  # seed-major order: an interrupted run still has every row
        for prefix, model, kd_train, scratch_train in rows
        for kd in (True, False)
    ]


def is_done(path: Path) -> bool:
    return all(p.is_file() for p in checkpoint_paths(path))


def best_by_validation(paths: list[Path], within_epochs: int = 0) -> Path:
    """The checkpoint whose saved weights score best on validation (balanced accuracy, then loss)."""
    return max(paths, key=lambda p: CheckpointMeta.read(p).selection_score(within_epochs))


def teacher_candidates(preset: Preset) -> list[tuple[ModelConfig, int | None]]:
    """(config, epochs override) of the preset's teacher and its alternatives."""
    budget = preset.alternative_epochs or None
    return [(preset.teacher, None)] + [(cfg, budget) for cfg in preset.teacher_alternatives]
