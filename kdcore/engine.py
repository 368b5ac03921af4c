"""Training loop: AdamW + warm-up/cosine, class weights, checkpoint on best *validation*
score, early stopping, per-epoch resumable state, seeded and reproducible."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from kdcore.config import CLASS_NAMES, TrainConfig
from kdcore.distill import Distiller
from kdcore.models import WeightsError, load_tensor_file, new_layer_parameters, set_train_mode
from kdcore.transforms import Preprocess, UltrasoundAugment


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class OnlineAugmented(Dataset):
    """Cached resized images, augmented afresh every time (teacher training)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: UltrasoundAugment | None) -> None:
        self.images, self.labels, self.augment = images, labels, augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        image = self.images[i] if self.augment is None else self.augment(self.images[i])
        return image, self.labels[i], torch.full((len(CLASS_NAMES),), float("nan"))


class FixedViewBank(Dataset):
    """V fixed augmented views per image, with the teacher's logits on each view.

    Caching the teacher's logits is exact here because the student sees exactly the
    views the teacher scored; each epoch picks one view per image at random.
    """

    def __init__(self, views: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None) -> None:
        self.views, self.labels, self.teacher_logits = views, labels, teacher_logits

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, i: int):
        v = int(torch.randint(self.views.shape[1], ()))
        logits = (
            self.teacher_logits[i, v]
            if self.teacher_logits is not None
            else torch.full((len(CLASS_NAMES),), float("nan"))
        )
        return self.views[i, v], self.labels[i], logits


def build_view_bank(images: torch.Tensor, augment: UltrasoundAugment, views: int, seed: int) -> torch.Tensor:
    """(N, V, 1, S, S) uint8: view 0 is the plain image, the rest are seeded augmentations."""
    seed_everything(seed)
    bank = torch.empty((len(images), views, *images.shape[1:]), dtype=torch.uint8)
    for i, image in enumerate(tqdm(images, desc="augmented views", leave=False)):
        bank[i, 0] = image
        for v in range(1, views):
            bank[i, v] = augment(image)
    return bank


def to_model_input(preprocess: Preprocess, images: torch.Tensor) -> torch.Tensor:
    """Normalised batch in channels-last layout (about 2x faster on CPU for these CNNs)."""
    return preprocess.normalize(images).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def predict_logits(
    model: nn.Module, images: torch.Tensor, preprocess: Preprocess, batch_size: int = 64
) -> torch.Tensor:
    """Logits of a model in eval mode for (N, 1, S, S) uint8 images."""
    was_training = model.training
    model.eval()
    out = torch.cat(
        [model(to_model_input(preprocess, images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    )
    set_train_mode(model, was_training)
    return out


def class_weights_for(labels: torch.Tensor) -> torch.Tensor:
    """Inverse-frequency weights, mean 1 (the imbalance handling)."""
    counts = torch.bincount(labels, minlength=len(CLASS_NAMES)).float().clamp(min=1)
    weights = counts.sum() / counts
    return weights / weights.mean()


@dataclass
class FitResult:
    best_state: dict[str, torch.Tensor]
    best_epoch: int
    best_score: tuple[float, float]
    history: list[dict[str, float]] = field(default_factory=list)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def validation_scores(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, preprocess: Preprocess
) -> dict[str, float]:
    logits = predict_logits(model, images, preprocess)
    pred = logits.argmax(1)
    recalls = [(pred[labels == c] == c).float().mean().item() for c in labels.unique()]
    return {
        "val_loss": F.cross_entropy(logits, labels).item(),
        "val_accuracy": (pred == labels).float().mean().item(),
        "val_balanced_accuracy": float(np.mean(recalls)),
    }


def fit(
    model: nn.Module,
    train_set: Dataset,
    val_images: torch.Tensor,
    val_labels: torch.Tensor,
    train_labels: torch.Tensor,
    preprocess: Preprocess,
    cfg: TrainConfig,
    work_dir: Path,
    resume: bool = False,
    desc: str = "train",
) -> FitResult:
    """Train ``model`` (KD when the dataset yields teacher logits), keeping the best
    validation state (balanced accuracy, then lower validation loss)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    state_path = work_dir / "last.pt"
    seed_everything(cfg.seed)
    model.to(memory_format=torch.channels_last)
    weights = class_weights_for(train_labels) if cfg.class_weighting else None
    distiller = Distiller(model, None, cfg.alpha, cfg.kd_temperature, weights, cfg.label_smoothing)
    if cfg.keep not in ("best", "last"):
        raise ValueError(f"keep must be 'best' or 'last', got {cfg.keep!r}")
    new = {id(p) for p in new_layer_parameters(model)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if id(p) in new], "lr": cfg.lr},
        {"params": [p for p in trainable if id(p) not in new], "lr": cfg.lr * cfg.backbone_lr_scale},
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total_steps, warmup = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, total_steps, warmup))
    result = FitResult({k: v.clone() for k, v in model.state_dict().items()}, 0, (-1.0, 0.0))
    start_epoch = 1
    if resume and state_path.is_file():
        try:
            saved: dict[str, Any] = load_tensor_file(state_path)
        except WeightsError as exc:
            raise WeightsError(f"cannot resume from {state_path}: {exc}; delete it or run without --resume") from exc
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        result = FitResult(saved["best_state"], saved["best_epoch"], tuple(saved["best_score"]), saved["history"])
        start_epoch = saved["epoch"] + 1
        print(f"[{desc}] resumed after epoch {saved['epoch']}")
    stale = start_epoch - 1 - result.best_epoch
    for epoch in range(start_epoch, cfg.epochs + 1):
        if cfg.keep == "best" and stale >= cfg.patience:
            print(f"[{desc}] early stop: no validation gain for {cfg.patience} epochs")
            break
        seed_everything(cfg.seed * 1000 + epoch)  # per-epoch seeding makes --resume exact
        loader = DataLoader(
            train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=len(train_set) > cfg.batch_size
        )
        distiller.train()
        started, sums, count = time.time(), {"loss": 0.0, "ce": 0.0, "kd": 0.0}, 0
        bar = tqdm(loader, desc=f"[{desc}] epoch {epoch}/{cfg.epochs}", leave=False)
        for images, targets, teacher_logits in bar:
            has_teacher = not torch.isnan(teacher_logits).any()
            losses = distiller(to_model_input(preprocess, images), targets, teacher_logits if has_teacher else None)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()
            scheduler.step()
            for key in sums:
                sums[key] += losses[key].item() * len(targets)
            count += len(targets)
            bar.set_postfix(loss=f"{sums['loss'] / count:.3f}")
        row = {
            "epoch": epoch,
            "train_loss": sums["loss"] / count,
            "train_ce": sums["ce"] / count,
            "train_kd": sums["kd"] / count,
            "lr": scheduler.get_last_lr()[0],
            **validation_scores(model, val_images, val_labels, preprocess),
            "seconds": time.time() - started,
        }
        result.history.append(row)
        score = (row["val_balanced_accuracy"], -row["val_loss"])
        improved = score > result.best_score if cfg.keep == "best" else True
        if improved:
            result.best_state = {k: v.clone() for k, v in model.state_dict().items()}
            result.best_epoch, result.best_score, stale = epoch, score, 0
        else:
            stale += 1
        print(
            f"[{desc}] epoch {epoch}: loss {row['train_loss']:.3f} val_loss {row['val_loss']:.3f} "
            f"val_bacc {row['val_balanced_accuracy']:.3f} val_acc {row['val_accuracy']:.3f} "
            f"({row['seconds']:.0f}s){' *best*' if improved else ''}",
            flush=True,
        )
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "best_state": result.best_state,
                "best_epoch": result.best_epoch,
                "best_score": list(result.best_score),
                "history": result.history,
            },
            state_path,
        )
    model.load_state_dict(result.best_state)
    return result
