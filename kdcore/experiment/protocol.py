"""The experiment steps behind ``train.py``: load BUSI, train the teacher, distil or
train students, calibrate on validation, evaluate on test or on any class folder."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from kdcore.checkpoint import CheckpointMeta, checkpoint_paths, save_checkpoint, write_record
from kdcore.config import CLASS_NAMES, ModelConfig, PreprocessConfig, TrainConfig
from kdcore.data import (
    DataIntegrityError,
    ImageRecord,
    folder_records,
    label_indices,
    read_manifest,
    read_split_file,
    records_in,
    resize_all,
    resized_masks,
    verify_files,
)
from kdcore.engine import (
    FitResult,
    FixedViewBank,
    OnlineAugmented,
    ViewBank,
    fit,
    predict_logits,
    seed_everything,
)
from kdcore.experiment.teacher_outputs import teacher_view_outputs
from kdcore.experiment.view_banks import cached_bank, with_unlabeled_frames
from kdcore.hashing import sha256_file
from kdcore.imaging import read_grey_image
from kdcore.inference import Predictor, load_predictor
from kdcore.metrics import (
    evaluate_predictions,
    expected_calibration_error,
    fit_temperature,
    markdown_table,
    plot_confusion_matrix,
)
from kdcore.models import build_model, feature_map_side
from kdcore.operating_point import POSITIVE_CLASS, OperatingPoint, choose_operating_point
from kdcore.probe import fit_probe_head
from kdcore.runtime import CPU, Runtime, barrier, main_first
from kdcore.transforms import Preprocess, UltrasoundAugment

SPLITS = ("train", "val", "test")


@dataclass
class BusiData:
    """The three splits: records, labels and the grey images, resized on demand and cached
    per input size (the teacher and the student may use different sizes)."""

    root: Path
    split_sha256: str
    records: dict[str, list[ImageRecord]]
    labels: dict[str, torch.Tensor]
    greys: dict[str, list[np.ndarray]]
    _resized: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict, repr=False)

    def images(self, split: str, size: int) -> torch.Tensor:
        """(N, 1, size, size) uint8 images of ``split``."""
        key = (split, size)
        if key not in self._resized:
            self._resized[key] = resize_all(self.greys[split], size)
        return self._resized[key]

    def lesion_masks(self, split: str, size: int) -> torch.Tensor:
        """(N, 1, size, size) uint8 lesion masks of ``split``, aligned with ``images``; 0 where none."""
        key = (f"{split}/masks", size)
        if key not in self._resized:
            self._resized[key] = resized_masks(self.root, self.records[split], size)
        return self._resized[key]


def load_busi(root: Path, split_file: Path, allow_mismatch: bool = False, subset: int = 0) -> BusiData:
    """Check files against manifest and split file, then read the grey images once."""
    root = Path(root)
    if not root.is_dir():
        raise DataIntegrityError(f"data folder not found: {root} (pass --data DIR)")
    split_rows = read_split_file(split_file, root)
    manifest = {r.file: r.sha256 for r in read_manifest(root)}
    disagreeing = [r.file for r in split_rows if manifest.get(r.file) != r.sha256]
    if disagreeing and not allow_mismatch:
        raise DataIntegrityError(
            f"split file and manifest.csv disagree on {len(disagreeing)} file(s), e.g. "
            f"{disagreeing[:3]}; regenerate the split with `python train.py split`"
        )
    used = [r for r in split_rows if r.split in SPLITS]
    verify_files(root, used, allow_mismatch)
    records = {s: records_in(split_rows, s, subset) for s in SPLITS}
    return BusiData(
        root=root,
        split_sha256=sha256_file(Path(split_file)),
        records=records,
        labels={s: label_indices(records[s]) for s in SPLITS},
        greys={s: [read_grey_image(root / r.file) for r in records[s]] for s in SPLITS},
    )


def _calibrate(
    model: torch.nn.Module, data: BusiData, preprocess: Preprocess
) -> tuple[float, dict[str, float], OperatingPoint]:
    """Temperature fitted on validation logits (never test), with validation ECE before/after,
    and the operating point chosen on the calibrated validation probabilities."""
    logits = predict_logits(model, data.images("val", preprocess.cfg.input_size), preprocess)
    labels = data.labels["val"].numpy()
    temperature = fit_temperature(logits, data.labels["val"])
    probs = torch.softmax(logits / temperature, 1).numpy()
    return (
        temperature,
        {
            "val_ece_before": expected_calibration_error(labels, torch.softmax(logits, 1).numpy()),
            "val_ece_after": expected_calibration_error(labels, probs),
        },
        validation_operating_point(probs, labels),
    )


def validation_operating_point(probs: np.ndarray, labels: np.ndarray) -> OperatingPoint:
    """The malignant threshold for the target sensitivity on calibrated validation probabilities."""
    positive = CLASS_NAMES.index(POSITIVE_CLASS)
    return choose_operating_point(probs[:, positive], labels == positive, "validation split")


def _fit_and_save(
    model: torch.nn.Module,
    train_set: Dataset,
    model_cfg: ModelConfig,
    preprocess_cfg: PreprocessConfig,
    train_cfg: TrainConfig,
    data: BusiData,
    out_path: Path,
    resume: bool,
    role: str,
    half: bool,
    teacher_weights_sha256: str = "",
    history_before: list[dict[str, float]] | None = None,
    runtime: Runtime = CPU,
) -> Path:
    """Train on ``train_set`` (best state on validation), calibrate on validation, save;
    ``history_before``: rows of an earlier stage (a probe) kept at the head of the history."""
    result = fit(
        model,
        train_set,
        data.images("val", preprocess_cfg.input_size),
        data.labels["val"],
        data.labels["train"],
        Preprocess(preprocess_cfg),
        train_cfg,
        out_path.parent / "work" / out_path.name,
        resume,
        desc=out_path.name,
        runtime=runtime,
    )
    result.history[:0] = history_before or []
    return _calibrate_and_save(model, result, model_cfg, preprocess_cfg, train_cfg, data, out_path, role, half,
                               teacher_weights_sha256, runtime)  # fmt: skip


def _calibrate_and_save(
    model: torch.nn.Module,
    result: FitResult,
    model_cfg: ModelConfig,
    preprocess_cfg: PreprocessConfig,
    train_cfg: TrainConfig,
    data: BusiData,
    out_path: Path,
    role: str,
    half: bool,
    teacher_weights_sha256: str = "",
    runtime: Runtime = CPU,
) -> Path:
    """Temperature on validation, then the weights and their record (rank 0 writes them; the
    other ranks wait until they are on disk)."""
    weights_path, _ = checkpoint_paths(out_path)
    if not runtime.is_main:
        barrier(runtime)
        return weights_path
    preprocess = Preprocess(preprocess_cfg)
    model = model.to(memory_format=torch.contiguous_format).eval()
    temperature, calibration, point = _calibrate(model, data, preprocess)
    meta = CheckpointMeta(
        model=model_cfg,
        preprocess=preprocess_cfg,
        class_names=CLASS_NAMES,
        role=role,
        calibration_temperature=temperature,
        calibration=calibration,
        training=train_cfg,
        split_sha256=data.split_sha256,
        best_epoch=result.best_epoch,
        validation=next((h for h in result.history if h["epoch"] == result.best_epoch), {}),
        history=tuple(result.history),
        teacher_weights_sha256=teacher_weights_sha256,
        operating_point=point,
        runtime=runtime.record(),
    )
    save_checkpoint(out_path, model, meta, half=half)
    barrier(runtime)
    return weights_path


HEAD_FITS = ("sgd", "probe", "probe_sgd")


def train_teacher(
    model_cfg: ModelConfig,
    preprocess_cfg: PreprocessConfig,
    train_cfg: TrainConfig,
    data: BusiData,
    out_path: Path,
    resume: bool = False,
    runtime: Runtime = CPU,
) -> Path:
    """Train the teacher with fresh augmentation every epoch; or (``head_fit=probe``) fit an
    ensemble's linear head in one go on its ImageNet features; or (``probe_sgd``) both, the
    probe first (linear probing, then fine-tuning: Kumar et al., ICLR 2022)."""
    if train_cfg.head_fit not in HEAD_FITS:
        raise ValueError(f"head_fit must be one of {HEAD_FITS}, got {train_cfg.head_fit!r}")
    seed_everything(train_cfg.seed)  # the initial weights follow the seed, not earlier RNG use
    model = build_model(model_cfg, preprocess_cfg.input_size)
    size = preprocess_cfg.input_size
    probe_rows: list[dict[str, float]] = []
    if train_cfg.head_fit != "sgd":
        probed = fit_probe_head(
            model, data.images("train", size), data.labels["train"], data.images("val", size), data.labels["val"],
            Preprocess(preprocess_cfg), train_cfg,
        )  # fmt: skip
        if train_cfg.head_fit == "probe":
            return _calibrate_and_save(
                model, probed, model_cfg, preprocess_cfg, train_cfg, data, out_path, "teacher", True, runtime=runtime
            )
        probe_rows = probed.history
    augment = UltrasoundAugment(train_cfg.augment, size)
    train_set = OnlineAugmented(data.images("train", size), data.labels["train"], augment)
    return _fit_and_save(
        model, train_set, model_cfg, preprocess_cfg, train_cfg, data, out_path, resume, "teacher", True,
        history_before=probe_rows, runtime=runtime,
    )  # fmt: skip


def cached_view_bank(data: BusiData, size: int, train_cfg: TrainConfig, cache: Path) -> ViewBank:
    """The student's view bank, built once per (images, augmentation, views) and cached: every
    student recipe with the same views (scratch, KD, KD + attention or mask guidance) reuses the
    file and the teacher's outputs on it. The lesion masks always travel with the views (moving
    them does not change the views), whether or not a recipe uses them."""
    records = data.records.get("train") or []  # none: in-memory test data (no masks, sequential seeds)
    masks = data.lesion_masks("train", size) if records else None
    image_keys = [r.sha256 for r in records] or None  # each image's views seeded by the image
    return cached_bank(data.images("train", size), data.labels["train"], masks, image_keys, train_cfg, cache)


def train_student(
    model_cfg: ModelConfig,
    preprocess_cfg: PreprocessConfig,
    train_cfg: TrainConfig,
    data: BusiData,
    out_path: Path,
    teacher_path: Path | None,
    resume: bool = False,
    cache_dir: Path | None = None,
    runtime: Runtime = CPU,
) -> Path:
    """Student on fixed augmented views; with ``teacher_path`` it is distilled (KD),
    without it the same recipe minus the teacher (the ablation). Teacher outputs on the views
    are cached in ``cache_dir`` (default: ``work/`` beside ``out_path``); under torchrun rank 0
    builds the caches and the other ranks read them."""
    if train_cfg.unlabeled_frames and teacher_path is None:
        raise ValueError("unlabeled_frames: frames without labels need a teacher (drop them for scratch students)")
    if train_cfg.feature_weight > 0 and (
        teacher_path is None or CheckpointMeta.read(teacher_path).model.kind != "ensemble"
    ):
        raise ValueError("feature_weight > 0 needs a feature-ensemble teacher (its pooled features are the targets)")
    cache = cache_dir if cache_dir is not None else out_path.parent / "work"
    bank = main_first(runtime, lambda: cached_view_bank(data, preprocess_cfg.input_size, train_cfg, cache))
    seed_everything(train_cfg.seed)  # else the view bank's fixed seed gives every student seed the same init
    model = build_model(model_cfg, preprocess_cfg.input_size)
    outputs = None
    if teacher_path is not None:  # the teacher's maps are pooled to the size of the student's
        side = feature_map_side(model, preprocess_cfg.input_size)
        matched = train_cfg.feature_weight > 0
        outputs = main_first(
            runtime, lambda: teacher_view_outputs(teacher_path, bank, cache, side, runtime.device, matched)
        )
    if train_cfg.unlabeled_frames:
        joined = (bank, outputs, teacher_path, train_cfg, side, cache, runtime.device)
        bank, outputs = main_first(runtime, lambda: with_unlabeled_frames(*joined))
    if train_cfg.mask_weight <= 0:
        bank = replace(bank, masks=None)  # the recipe does not use them: not batched either
    logits, attention, features = outputs if outputs is not None else (None, None, None)
    train_set = FixedViewBank(bank, logits, attention, features)
    teacher_sha = CheckpointMeta.read(teacher_path).weights_sha256 if teacher_path else ""
    role = "student_kd" if teacher_path else "student_scratch"
    return _fit_and_save(
        model, train_set, model_cfg, preprocess_cfg, train_cfg, data, out_path, resume, role, False, teacher_sha,
        runtime=runtime,
    )  # fmt: skip


def evaluation_records(data_dir: Path, split_file: Path) -> list[ImageRecord]:
    """The images to score in ``data_dir``.

    BUSI (its manifest holds the split file's images): the split file's test rows. Any other
    folder: its class sub-folders; when it has a ``manifest.csv`` (e.g. BrEaST-Lesions-USG),
    every file it lists is first checked (present, same sha256, same class folder).
    """
    data_dir = Path(data_dir)
    if not (data_dir / "manifest.csv").is_file():
        return folder_records(data_dir)
    manifest = {r.file: r for r in read_manifest(data_dir)}
    split_rows = read_split_file(split_file)
    if all(manifest.get(r.file) is not None and manifest[r.file].sha256 == r.sha256 for r in split_rows):
        test_rows = [r for r in split_rows if r.split == "test"]
        verify_files(data_dir, test_rows)
        return test_rows
    verify_files(data_dir, list(manifest.values()))
    records = folder_records(data_dir)
    wrong_class = [r.file for r in records if r.file in manifest and manifest[r.file].label != r.label]
    if wrong_class:
        raise DataIntegrityError(
            f"{len(wrong_class)} file(s) sit in another class folder than manifest.csv says, e.g. {wrong_class[:3]}"
        )
    return records


def predict_records(predictor: Predictor, root: Path, records: list[ImageRecord]) -> np.ndarray:
    """Calibrated probabilities (N, C) for the records' images."""
    logits = predictor.logits_for([read_grey_image(Path(root) / r.file) for r in records])
    return predictor.probabilities(logits).numpy()


def set_operating_point(checkpoint: Path, data: BusiData, device: torch.device = CPU.device) -> OperatingPoint:
    """Choose ``checkpoint``'s operating point on the validation split and store it in its record."""
    predictor = load_predictor(checkpoint)
    predictor.model.to(device)
    labels = data.labels["val"].numpy()
    probs = predictor.probabilities(predictor.logits_for(data.greys["val"])).numpy()
    point = validation_operating_point(probs, labels)
    write_record(checkpoint, replace(predictor.meta, operating_point=point))
    return point


def evaluate_checkpoint(
    checkpoint: Path, data_dir: Path, split_file: Path, out_json: Path | None, device: torch.device = CPU.device
) -> dict[str, Any]:
    """Evaluation JSON (+ Markdown table and confusion-matrix PNG beside ``out_json``)."""
    predictor = load_predictor(checkpoint)
    predictor.model.to(device)
    records = evaluation_records(data_dir, split_file)
    probs = predict_records(predictor, data_dir, records)
    y_true = label_indices(records).numpy()
    scores = evaluate_predictions(y_true, probs, predictor.meta.operating_point)
    result = {"checkpoint": str(checkpoint), "data": str(data_dir), **scores}
    if out_json is not None:
        out_json = Path(out_json)
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(result, indent=2))
        title = f"{Path(checkpoint).with_suffix('').name} on {Path(data_dir).name} (n={result['n']})"
        out_json.with_suffix(".md").write_text(markdown_table(result, title))
        plot_confusion_matrix(result, out_json.with_suffix(".png"), title)
    return result
