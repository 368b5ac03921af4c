"""The runs of the reference protocol: their names, the student rows, and selection on validation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kdcore.checkpoint import CheckpointMeta, checkpoint_paths
from kdcore.config import (
    ModelConfig,
    Preset,
    TrainConfig,
    extra_student_recipe,
    logits_kd_recipe,
    scratch_recipe,
    with_overrides,
)


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
    """Per seed, the student's ablation arms (KD, KD with logits only when the recipe has
    extras, scratch) and the extra (EfficientNet-Lite0) student's KD and scratch runs."""
    arms = [("kd", preset.student_train, True)]
    logits_only = logits_kd_recipe(preset)
    if logits_only is not None:
        arms.append(("kd_logits", logits_only, True))
    rows = [("mobilenetv3", preset.student, arms + [("scratch", scratch_recipe(preset), False)])]
    if include_extra and preset.extra_student is not None:
        extra_train = extra_student_recipe(preset)
        rows.append(
            ("efficientnet_lite0", preset.extra_student, [("kd", extra_train, True), ("scratch", extra_train, False)])
        )
    return [
        StudentRun(f"{prefix}_{arm}", model, with_overrides(train, seed=seed, epochs=epochs), with_teacher, seed)
        for seed in seeds  # seed-major order: an interrupted run still has every row
        for prefix, model, row_arms in rows
        for arm, train, with_teacher in row_arms
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
