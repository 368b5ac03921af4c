"""The About tab: what the shipped models are, how well they did, and what this app is not."""

from __future__ import annotations

from kdcore.app.service import HOW_TO_GET_CHECKPOINTS, ROLES, LoadedModels
from kdcore.checkpoint import CheckpointMeta
from kdcore.operating_point import verdict_rule

NOT_A_DEVICE = (
    "## Research demo — not a diagnostic device\n"
    "This app demonstrates knowledge distillation on the public BUSI dataset. It is not a "
    "medical device, has not been clinically validated, and must not be used to diagnose, "
    "treat or triage patients."
)


def _numbers_table(title: str, values: dict[str, float]) -> str:
    """Markdown table of the numeric entries of ``values``."""
    rows = [f"| {key} | {value:.4g} |" for key, value in values.items() if isinstance(value, int | float)]
    if not rows:
        return ""
    return "\n".join([f"**{title}**", "", "| metric | value |", "|---|---|", *rows, ""])


def checkpoint_markdown(role: str, meta: CheckpointMeta) -> str:
    calibration = {"temperature": meta.calibration_temperature, **meta.calibration}
    parts = [
        f"### {role.capitalize()}: {meta.architecture}",
        f"Input {meta.preprocess.input_size} px, classes: {', '.join(meta.class_names)}.",
        "",
        _numbers_table(f"Validation (best epoch, {meta.best_epoch})", meta.validation),
        _numbers_table("Calibration (fitted on validation)", calibration),
        f"**Verdict rule**: {verdict_rule(meta.operating_point)}.",
    ]
    return "\n".join(parts)


def about_markdown(models: LoadedModels) -> str:
    sections = [NOT_A_DEVICE]
    for role in ROLES:
        if role in models.metas:
            sections.append(checkpoint_markdown(role, models.metas[role]))
        else:
            sections.append(f"### {role.capitalize()}: not loaded\n{HOW_TO_GET_CHECKPOINTS}")
    sections.append(models.model_card or "_No MODEL_CARD.md in the checkpoints folder yet._")
    return "\n\n".join(sections)
