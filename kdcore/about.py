"""The About tab: what the shipped models are, how well they did, and what this app is not."""

from __future__ import annotations

from typing import Any

from kdcore.service import HOW_TO_GET_CHECKPOINTS, ROLES, LoadedModels

NOT_A_DEVICE = (
    "## Research demo — not a diagnostic device\n"
    "This app demonstrates knowledge distillation on the public BUSI dataset. It is not a "
    "medical device, has not been clinically validated, and must not be used to diagnose, "
    "treat or triage patients."
)


def _numbers_table(title: str, values: dict[str, Any]) -> str:
    """Markdown table of the numeric entries of ``values`` (nested dicts are skipped)."""
    rows = [f"| {key} | {value:.4g} |" for key, value in values.items() if isinstance(value, int | float)]
    if not rows:
        return ""
    return "\n".join([f"**{title}**", "", "| metric | value |", "|---|---|", *rows, ""])


def checkpoint_markdown(role: str, config: dict[str, Any]) -> str:
    args = config.get("model_args", {})
    branches = [args.get("global_branch"), args.get("cnn_name")]
    architecture = " + ".join(b for b in branches if b and b != "none")
    parts = [
        f"### {role.capitalize()}: {architecture}",
        f"Input {config.get('preprocess', {}).get('input_size', '?')} px, classes: "
        f"{', '.join(config.get('class_names', []))}.",
        "",
        _numbers_table("Validation (best epoch)", config.get("validation", {})),
        _numbers_table("Calibration", config.get("calibration", {})),
        _numbers_table("Test", config.get("metrics", {})),
    ]
    return "\n".join(parts)


def about_markdown(models: LoadedModels) -> str:
    sections = [NOT_A_DEVICE]
    for role in ROLES:
        if role in models.configs:
            sections.append(checkpoint_markdown(role, models.configs[role]))
        else:
            sections.append(f"### {role.capitalize()}: not loaded\n{HOW_TO_GET_CHECKPOINTS}")
    sections.append(models.model_card or "_No MODEL_CARD.md in the checkpoints folder yet._")
    return "\n\n".join(sections)
