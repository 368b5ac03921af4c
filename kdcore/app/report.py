"""Case report: one image's analysis as a one-page PDF or PNG that opens anywhere: the image,
both Grad-CAM overlays, both predictions with calibrated probabilities, the decision rule,
latencies, model names and checkpoint hashes, the date and the disclaimer."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from kdcore.app.service import DISCLAIMER, ROLES, ImageAnalysis, LoadedModels  # noqa: E402
from kdcore.operating_point import verdict_rule  # noqa: E402

REPORT_FORMATS = ("pdf", "png")


def _model_lines(models: LoadedModels, analysis: ImageAnalysis, role: str) -> list[str]:
    prediction, meta = analysis.predictions.get(role), models.metas.get(role)
    if prediction is None or meta is None:
        return [f"{role.capitalize()}: not loaded"]
    probabilities = ", ".join(f"{name} {p:.1%}" for name, p in prediction.probabilities.items())
    total = analysis.total_ms.get(role)
    timing = f"forward pass {prediction.latency_ms:.1f} ms" + (f", with Grad-CAM {total:.0f} ms" if total else "")
    return [
        f"{role.capitalize()}: {prediction.label.upper()}  ({probabilities})",
        f"    model {meta.architecture}, {timing}",
        f"    checkpoint sha256 {meta.weights_sha256[:16]}..., calibration T {meta.calibration_temperature:.2f}",
        f"    verdict rule: {verdict_rule(meta.operating_point)}",
    ]


def _agreement(analysis: ImageAnalysis) -> str:
    labels = {role: p.label for role, p in analysis.predictions.items()}
    if len(labels) < 2:
        return "Only one model is loaded."
    if labels["teacher"] == labels["student"]:
        return f"Teacher and student agree: {labels['teacher']}."
    return f"DISAGREEMENT: teacher says {labels['teacher']}, student says {labels['student']}."


def write_case_report(
    models: LoadedModels, analysis: ImageAnalysis, opacity: float, out: Path, source_name: str = "image"
) -> Path:
    """Render the report to ``out`` (``.pdf`` or ``.png``, by its suffix); its text is also the
    file's metadata (PDF Subject, PNG Description)."""
    if out.suffix.lstrip(".") not in REPORT_FORMATS:
        raise ValueError(f"report format must be one of {REPORT_FORMATS}, got {out.suffix!r}")
    panels = [("Image", analysis.grey, "gray")]
    panels += [(f"{role.capitalize()} Grad-CAM ({analysis.explained_class(role)})", analysis.overlay(role, opacity),
                None) for role in ROLES if role in analysis.predictions]  # fmt: skip
    fig = plt.figure(figsize=(11.69, 8.27))  # A4 landscape
    fig.suptitle(f"Breast ultrasound KD demo: case report for {source_name}", fontsize=14, x=0.02, ha="left")
    for i, (title, picture, cmap) in enumerate(panels):
        ax = fig.add_axes((0.02 + i * 0.325, 0.38, 0.31, 0.5))
        ax.imshow(picture, cmap=cmap, vmin=0, vmax=255)
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    created = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = [line for role in ROLES for line in _model_lines(models, analysis, role)]
    lines += [
        "",
        _agreement(analysis),
        "Grad-CAM colours: blue = little, red = much evidence for the class named above the overlay.",
        f"Created {created}.",
        "",
        DISCLAIMER.replace("**", ""),
    ]
    fig.text(0.02, 0.33, "\n".join(lines), va="top", family="monospace", fontsize=8.5)
    out.parent.mkdir(parents=True, exist_ok=True)
    title = f"Case report: {source_name}"
    text = "\n".join(lines)  # also stored as the file's metadata, so the record is searchable
    metadata = {"Title": title, "Subject": text} if out.suffix == ".pdf" else {"Title": title, "Description": text}
    fig.savefig(out, dpi=110, metadata=metadata)
    plt.close(fig)
    return out
