"""Batch analysis: many images (or a zip) -> one row per file with both models' verdicts, a CSV,
and, when the files sit in benign/ malignant/ normal/ folders of a zip, the metrics and
confusion matrix of ``train.py evaluate`` (the same ``kdcore.metrics`` code).

Bounded like every upload: at most ``MAX_BATCH_FILES`` images, zip members no larger than the
upload limit and ``MAX_ZIP_BYTES`` unpacked in total; members are read by name into a private
folder (never extracted by their own paths, so ``../`` cannot escape).
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd

from kdcore.app.service import LOW_CONFIDENCE, ROLES, LoadedModels
from kdcore.config import CLASS_NAMES
from kdcore.imaging import IMAGE_SUFFIXES, ImageReadError, file_colour_share, not_bmode_warning, read_grey_image
from kdcore.metrics import evaluate_predictions, markdown_table, plot_confusion_matrix

MAX_BATCH_FILES = 500
MAX_MEMBER_BYTES = 50 * 1024 * 1024
MAX_ZIP_BYTES = 1024 * 1024 * 1024


class BatchError(ValueError):
    """A batch that cannot be analysed at all; the message is meant for the user."""


@dataclass(frozen=True)
class BatchItem:
    name: str  # as the user knows it: the file name, or its path inside the zip
    path: Path
    true_label: str | None  # from a benign/ malignant/ normal/ folder of a zip


def _folder_label(member: PurePosixPath) -> str | None:
    labels = [part for part in member.parts[:-1] if part in CLASS_NAMES]
    return labels[-1] if labels else None


def _unpack(archive: Path, work_dir: Path, items: list[BatchItem]) -> None:
    try:
        with zipfile.ZipFile(archive) as zipped:
            members = [m for m in zipped.infolist() if not m.is_dir()]
            images = [m for m in members if PurePosixPath(m.filename).suffix.lower() in IMAGE_SUFFIXES]
            images = [m for m in images if not PurePosixPath(m.filename).name.startswith(".")]
            if sum(m.file_size for m in images) > MAX_ZIP_BYTES:
                raise BatchError(f"{archive.name}: unpacks to more than {MAX_ZIP_BYTES // 2**30} GB of images.")
            for member in images:
                name = PurePosixPath(member.filename)
                if member.file_size > MAX_MEMBER_BYTES:
                    raise BatchError(f"{archive.name}: {name} is larger than {MAX_MEMBER_BYTES // 2**20} MB.")
                target = work_dir / f"{len(items):05d}{name.suffix.lower()}"
                target.write_bytes(zipped.read(member))
                items.append(BatchItem(str(name), target, _folder_label(name)))
                _check_count(items)
    except zipfile.BadZipFile as exc:
        raise BatchError(f"{archive.name}: not a readable zip file ({exc}).") from exc


def _check_count(items: list[BatchItem]) -> None:
    if len(items) > MAX_BATCH_FILES:
        raise BatchError(f"more than {MAX_BATCH_FILES} images in one batch; split it.")


def collect_batch(paths: list[str], work_dir: Path) -> list[BatchItem]:
    """The images of the uploaded files (zips unpacked into ``work_dir``), in upload order."""
    items: list[BatchItem] = []
    for raw in paths:
        path = Path(raw)
        if path.suffix.lower() == ".zip":
            _unpack(path, work_dir, items)
        else:
            items.append(BatchItem(path.name, path, None))
            _check_count(items)
    if not items:
        raise BatchError("no image in the upload (supported: " + ", ".join(IMAGE_SUFFIXES) + ", or a .zip of them).")
    return items


ROW_COLUMNS = (
    "file", "true class", "teacher", "teacher p(malignant)", "student", "student p(malignant)", "agree", "flags",
)  # fmt: skip


def analyse_item(models: LoadedModels, item: BatchItem) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One table row and each model's probabilities (empty when the file was refused)."""
    row: dict[str, Any] = dict.fromkeys(ROW_COLUMNS, "")
    row.update({"file": item.name, "true class": item.true_label or ""})
    try:
        grey = read_grey_image(item.path, name=item.name)
    except ImageReadError as exc:
        row["flags"] = f"not analysed: {exc}"
        return row, {}
    probabilities, labels, flags = {}, {}, []
    for role in ROLES:
        if role not in models.cams:
            continue
        prediction = models.cams[role].predictor.predict(grey)
        probabilities[role] = np.array([prediction.probabilities[c] for c in CLASS_NAMES])
        labels[role] = prediction.label
        row[role] = f"{prediction.label} ({prediction.probabilities[prediction.label]:.0%})"
        row[f"{role} p(malignant)"] = round(prediction.probabilities["malignant"], 3)
        if prediction.probabilities[prediction.label] < LOW_CONFIDENCE:
            flags.append(f"{role} unsure")
    if not_bmode_warning(file_colour_share(item.path)):
        flags.append("in colour: not B-mode?")
    if len(labels) == 2:
        row["agree"] = "yes" if labels["teacher"] == labels["student"] else "NO"
        if row["agree"] == "NO":
            flags.append("disagreement")
    if item.true_label and labels.get("student") and labels["student"] != item.true_label:
        flags.append("student wrong")
    row["flags"] = ", ".join(flags)
    return row, probabilities


@dataclass(frozen=True)
class BatchResult:
    table: pd.DataFrame
    metrics_markdown: str
    confusion_png: Path | None


def analyse_batch(
    models: LoadedModels, items: list[BatchItem], out_dir: Path, on_item: Callable[[int, int], None] | None = None
) -> BatchResult:
    """Every item through every loaded model; metrics when all analysed items have a true class."""
    rows, scored = [], []
    for index, item in enumerate(items):
        row, probabilities = analyse_item(models, item)
        rows.append(row)
        if probabilities:
            scored.append((item.true_label, probabilities))
        if on_item is not None:
            on_item(index + 1, len(items))
    table = pd.DataFrame(rows, columns=list(ROW_COLUMNS))
    refused = len(items) - len(scored)
    note = f"{len(scored)} of {len(items)} files analysed" + (f", {refused} refused (see flags)" if refused else "")
    if not scored or any(label is None for label, _ in scored):
        hint = "Metrics need every image in a benign/, malignant/ or normal/ folder of a zip."
        return BatchResult(table, f"{note}. {hint}", None)
    y_true = np.array([CLASS_NAMES.index(label) for label, _ in scored])
    sections, confusion = [note + "."], None
    for role in ROLES:
        if role not in scored[0][1]:
            continue
        result = evaluate_predictions(y_true, np.stack([p[role] for _, p in scored]))
        sections.append(markdown_table(result, f"{role.capitalize()} on this batch (n={result['n']})"))
        if role == "student" or confusion is None:
            confusion = out_dir / f"confusion_{role}.png"
            plot_confusion_matrix(result, confusion, f"{role} on this batch")
    return BatchResult(table, "\n\n".join(sections), confusion)
