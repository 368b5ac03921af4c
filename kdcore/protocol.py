"""The experiment steps behind ``train.py``: load BUSI, train the teacher, distil or
train students, calibrate on validation, evaluate on test or on any class folder."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from kdcore.checkpoint import load_checkpoint, read_checkpoint_config, save_checkpoint
from kdcore.config import CLASS_NAMES, ModelConfig, PreprocessConfig, TrainConfig, to_dict
from kdcore.data import (
    DataIntegrityError,
    ImageRecord,
    folder_records,
    label_indices,
    load_resized,
    read_manifest,
    read_split_file,
    records_in,
    sha256_file,
    verify_files,
)
from kdcore.engine import (
    FixedViewBank,
    OnlineAugmented,
    build_view_bank,
    fit,
    predict_logits,
    seed_everything,
)
from kdcore.inference import Predictor
from kdcore.metrics import (
    evaluate_predictions,
    expected_calibration_error,
    fit_temperature,
    markdown_table,
    plot_confusion_matrix,
)
from kdcore.models import WeightsError, build_model, load_tensor_file
from kdcore.transforms import Preprocess, UltrasoundAugment

SPLITS = ("train", "val", "test")


@dataclass
class BusiData:
    """The three splits as cached (N, 1, S, S) uint8 images and label tensors."""

    root: Path
    split_sha256: str
    records: dict[str, list[ImageRecord]]
    images: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]


def load_busi(
    root: Path, split_file: Path, allow_mismatch: bool = False, subset: int = 0, input_size: int = 224
) -> BusiData:
    """Check files against manifest and split file, then cache the resized images."""
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
    resize = Preprocess(PreprocessConfig(input_size=input_size))
    records = {s: records_in(split_rows, s, subset) for s in SPLITS}
    return BusiData(
        root=root,
        split_sha256=sha256_file(Path(split_file)),
        records=records,
        images={s: load_resized(root, records[s], resize) for s in SPLITS},
        labels={s: label_indices(records[s]) for s in SPLITS},
    )


def _calibrate(model: torch.nn.Module, data: BusiData, preprocess: Preprocess) -> dict[str, float]:
    """Temperature fitted on validation logits (never test), with validation ECE before/after."""
    logits = predict_logits(model, data.images["val"], preprocess)
    labels = data.labels["val"].numpy()
    temperature = fit_temperature(logits, data.labels["val"])
    return {
        "temperature": temperature,
        "val_ece_before": expected_calibration_error(labels, torch.softmax(logits, 1).numpy()),
        "val_ece_after": expected_calibration_error(labels, torch.softmax(logits / temperature, 1).numpy()),
    }


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
    extra: dict[str, Any],
) -> Path:
    """Train on ``train_set`` (best state on validation), calibrate on validation, save."""
    preprocess = Preprocess(preprocess_cfg)
    work_dir = out_path.parent / "work" / out_path.name
    result = fit(
        model,
        train_set,
        data.images["val"],
        data.labels["val"],
        data.labels["train"],
        preprocess,
        train_cfg,
        work_dir,
        resume,
        desc=out_path.name,
    )
    model = model.to(memory_format=torch.contiguous_format).eval()
    val_scores = next((h for h in result.history if h["epoch"] == result.best_epoch), {})
    return save_checkpoint(
        out_path,
        model,
        model_cfg,
        preprocess_cfg,
        CLASS_NAMES,
        half=half,
        extra={
            "role": role,
            "training": to_dict(train_cfg),
            "split_sha256": data.split_sha256,
            "best_epoch": result.best_epoch,
            "validation": val_scores,
            "calibration": _calibrate(model, data, preprocess),
            "history": result.history,
            **extra,
        },
    )


def train_teacher(
    model_cfg: ModelConfig,
    preprocess_cfg: PreprocessConfig,
    train_cfg: TrainConfig,
    data: BusiData,
    out_path: Path,
    resume: bool = False,
) -> Path:
    """Train the hybrid teacher with fresh augmentation every epoch."""
    seed_everything(train_cfg.seed)  # the initial weights follow the seed, not earlier RNG use
    model = build_model(model_cfg, preprocess_cfg.input_size)
    augment = UltrasoundAugment(train_cfg.augment, preprocess_cfg.input_size)
    train_set = OnlineAugmented(data.images["train"], data.labels["train"], augment)
    return _fit_and_save(
        model, train_set, model_cfg, preprocess_cfg, train_cfg, data, out_path, resume, "teacher", half=True, extra={}
    )


def teacher_view_logits(teacher_path: Path, views: torch.Tensor, cache: Path) -> torch.Tensor:
    """(N, V, C) teacher logits on the fixed views, cached by teacher and view-bank hash."""
    import hashlib

    key = hashlib.sha256(views.numpy().tobytes()).hexdigest()[:16]
    weights_sha = read_checkpoint_config(teacher_path)["weights_sha256"][:16]
    cache_file = cache / f"teacher_logits_{weights_sha}_{key}.pt"
    if cache_file.is_file():
        try:
            return load_tensor_file(cache_file)
        except WeightsError as exc:  # a damaged or tampered cache is recomputed, never executed
            print(f"warning: ignoring teacher-logit cache {cache_file}: {exc}; recomputing it")
    teacher, config = load_checkpoint(teacher_path)
    teacher.to(memory_format=torch.channels_last)
    preprocess = Preprocess(Predictor(teacher, config).preprocess.cfg)
    flat = views.reshape(-1, *views.shape[2:])
    logits = predict_logits(teacher, flat, preprocess).reshape(*views.shape[:2], -1)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(logits, cache_file)
    return logits


def train_student(
    model_cfg: ModelConfig,
    preprocess_cfg: PreprocessConfig,
    train_cfg: TrainConfig,
    data: BusiData,
    out_path: Path,
    teacher_path: Path | None,
    resume: bool = False,
) -> Path:
    """Student on fixed augmented views; with ``teacher_path`` it is distilled (KD),
    without it the same recipe minus the teacher (the ablation)."""
    augment = UltrasoundAugment(train_cfg.augment, preprocess_cfg.input_size)
    bank_seed = 12345  # the same views for every student, KD or not: a fair ablation
    views = build_view_bank(data.images["train"], augment, train_cfg.views_per_image, bank_seed)
    logits = teacher_view_logits(teacher_path, views, out_path.parent / "work") if teacher_path is not None else None
    seed_everything(train_cfg.seed)  # else the view bank's fixed seed gives every student seed the same init
    model = build_model(model_cfg, preprocess_cfg.input_size)
    train_set = FixedViewBank(views, data.labels["train"], logits)
    extra = {"teacher_weights_sha256": read_checkpoint_config(teacher_path)["weights_sha256"]} if teacher_path else {}
    role = "student_kd" if teacher_path else "student_scratch"
    return _fit_and_save(
        model, train_set, model_cfg, preprocess_cfg, train_cfg, data, out_path, resume, role, half=False, extra=extra
    )


def evaluation_records(data_dir: Path, split_file: Path) -> list[ImageRecord]:
    """BUSI folder -> the split file's test rows; any other folder -> its class sub-folders."""
    data_dir = Path(data_dir)
    if (data_dir / "manifest.csv").is_file():
        return [r for r in read_split_file(split_file, data_dir) if r.split == "test"]
    return folder_records(data_dir)


def predict_records(predictor: Predictor, root: Path, records: list[ImageRecord]) -> np.ndarray:
    """Calibrated probabilities (N, C) for the records' images."""
    from kdcore.imaging import read_grey_image

    logits = predictor.logits_for([read_grey_image(Path(root) / r.file) for r in records])
    return predictor.probabilities(logits).numpy()


def evaluate_checkpoint(checkpoint: Path, data_dir: Path, split_file: Path, out_json: Path | None) -> dict[str, Any]:
    """Evaluation JSON (+ Markdown table and confusion-matrix PNG beside ``out_json``)."""
    from kdcore.inference import load_predictor

    predictor = load_predictor(checkpoint)
    records = evaluation_records(data_dir, split_file)
    probs = predict_records(predictor, data_dir, records)
    y_true = label_indices(records).numpy()
    result = {"checkpoint": str(checkpoint), "data": str(data_dir), **evaluate_predictions(y_true, probs)}
    if out_json is not None:
        out_json = Path(out_json)
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(result, indent=2))
        title = f"{Path(checkpoint).with_suffix('').name} on {Path(data_dir).name} (n={result['n']})"
        out_json.with_suffix(".md").write_text(markdown_table(result, title))
        plot_confusion_matrix(result, out_json.with_suffix(".png"), title)
    return result


def student_config_for(model_cfg: ModelConfig, init_weights: str | None) -> ModelConfig:
    return replace(model_cfg, cnn_init=init_weights) if init_weights else model_cfg
