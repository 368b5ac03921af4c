"""Training loop: AdamW + warm-up/cosine, class weights, checkpoint on best *validation*
score, early stopping, per-epoch resumable state, seeded and reproducible; on any device,
with optional mixed precision, and data-parallel over the ranks of a torchrun launch."""

from __future__ import annotations

import hashlib
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
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from kdcore.config import CLASS_NAMES, TrainConfig
from kdcore.distill import Distiller
from kdcore.models import WeightsError, load_tensor_file, new_layer_parameters, save_tensor_file, set_train_mode
from kdcore.runtime import CPU, Runtime, barrier, describe, from_main, sum_across_ranks
from kdcore.transforms import Preprocess, UltrasoundAugment


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


EMPTY = torch.empty(0)  # what a sample carries in place of teacher outputs or a mask it has not got


class OnlineAugmented(Dataset):
    """Cached resized images, augmented afresh every time (teacher training).

    Items: (image, class index, no teacher logits, no teacher attention, no mask, no teacher features).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: UltrasoundAugment | None) -> None:
        self.images, self.labels, self.augment = images, labels, augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        image = self.images[i] if self.augment is None else self.augment(self.images[i])
        return image, self.labels[i], EMPTY, EMPTY, EMPTY, EMPTY


@dataclass(frozen=True)
class ViewBank:
    """V fixed views per training image and their targets: (N, V, 1, S, S) uint8 views,
    (N, V, C) class probabilities (one-hot, or the mixing weights of a mixup view) and,
    optionally, the (N, V, 1, S, S) lesion masks moved with each view (0 on mixup views)."""

    views: torch.Tensor
    targets: torch.Tensor
    masks: torch.Tensor | None = None
    plain_views: int = 0  # the first views of each image, made from it alone (seeded by the image): 0 if not


class FixedViewBank(Dataset):
    """A ``ViewBank`` with the teacher's outputs on each view; each epoch picks one view per image.

    Caching the teacher's logits (attention maps, features) is exact here because the student
    sees exactly the views the teacher scored. Items: (view, target probabilities, teacher
    logits, teacher attention, lesion mask, teacher features), the teacher parts empty without
    them, the mask empty without masks.
    """

    def __init__(
        self,
        bank: ViewBank,
        teacher_logits: torch.Tensor | None,
        teacher_attention: torch.Tensor | None = None,
        teacher_features: torch.Tensor | None = None,
    ) -> None:
        self.bank, self.teacher_logits, self.teacher_attention = bank, teacher_logits, teacher_attention
        self.teacher_features = teacher_features
        self.set_epoch(0)

    def set_epoch(self, seed: int) -> None:
        """Pick this epoch's view of every image from ``seed`` alone, so that every data-loader
        worker and every distributed rank agrees on it."""
        generator = torch.Generator().manual_seed(seed)
        self.chosen = torch.randint(self.bank.views.shape[1], (len(self.bank.views),), generator=generator)

    def __len__(self) -> int:
        return len(self.bank.views)

    def __getitem__(self, i: int):
        v = int(self.chosen[i])
        logits = EMPTY if self.teacher_logits is None else self.teacher_logits[i, v]
        attention = EMPTY if self.teacher_attention is None else self.teacher_attention[i, v]
        mask = EMPTY if self.bank.masks is None else self.bank.masks[i, v]
        features = EMPTY if self.teacher_features is None else self.teacher_features[i, v]
        return self.bank.views[i, v], self.bank.targets[i, v], logits, attention, mask, features


def build_view_bank(
    images: torch.Tensor,
    labels: torch.Tensor,
    augment: UltrasoundAugment,
    views: int,
    seed: int,
    mixup_views: int = 0,
    mixup_alpha: float = 0.4,
    masks: torch.Tensor | None = None,
    image_keys: list[str] | None = None,
) -> ViewBank:
    """View 0 is the plain image, views 1..V-1 seeded augmentations; then ``mixup_views`` views
    that blend an augmentation of the image with one of another random image (weight
    lambda >= 0.5 on this image, lambda ~ Beta(alpha, alpha)), targets mixed alike. Mixup views
    widen where the student matches the teacher's function (Beyer et al., CVPR 2022). With
    (N, 1, S, S) lesion ``masks``, each plain view's mask is moved with it. With ``image_keys``
    (e.g. the images' sha256) each image's views are seeded by ``seed`` and its key alone, so an
    image has the same plain views in every fold (``plain_views``); mixup views still depend on
    the other images."""
    seed_everything(seed)
    n, classes = len(images), len(CLASS_NAMES)
    bank = torch.empty((n, views + mixup_views, *images.shape[1:]), dtype=torch.uint8)
    targets = torch.zeros((n, views + mixup_views, classes))
    view_masks = None if masks is None else torch.zeros_like(bank)
    one_hot = F.one_hot(labels, classes).float()
    beta = torch.distributions.Beta(mixup_alpha, mixup_alpha)
    for i, image in enumerate(tqdm(images, desc="augmented views", leave=False)):
        if image_keys is not None:
            seed_everything(int(hashlib.sha256(f"{seed}:{image_keys[i]}".encode()).hexdigest()[:15], 16))
        bank[i, 0], targets[i, :views] = image, one_hot[i]
        if view_masks is not None:
            view_masks[i, 0] = masks[i]
        for v in range(1, views):
            if view_masks is None:
                bank[i, v] = augment(image)
            else:
                bank[i, v], view_masks[i, v] = augment.with_mask(image, masks[i])
        for v in range(views, views + mixup_views):
            j = (i + int(torch.randint(1, n, ()))) % n if n > 1 else i
            lam = float(beta.sample())
            lam = max(lam, 1 - lam)
            mixed = lam * augment(image).float() + (1 - lam) * augment(images[j]).float()
            bank[i, v] = mixed.round().clamp(0, 255).to(torch.uint8)
            targets[i, v] = lam * one_hot[i] + (1 - lam) * one_hot[j]
    return ViewBank(bank, targets, view_masks, views if image_keys is not None else 0)


def to_model_input(preprocess: Preprocess, images: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    """Normalised batch, on the images' device, in channels-last layout by default (about 2x
    faster on CPU for these CNNs, and what tensor cores want)."""
    batch = preprocess.normalize(images)
    return batch.contiguous(memory_format=torch.channels_last) if channels_last else batch


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def predict_logits(
    model: nn.Module, images: torch.Tensor, preprocess: Preprocess, batch_size: int = 64
) -> torch.Tensor:
    """Logits (on the CPU) of a model in eval mode for (N, 1, S, S) uint8 images, computed
    on the model's device."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    out = torch.cat(
        [
            model(to_model_input(preprocess, images[i : i + batch_size].to(device))).float().cpu()
            for i in range(0, len(images), batch_size)
        ]
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


def _optimizer_for(model: nn.Module, cfg: TrainConfig, helpers: list[nn.Parameter]) -> torch.optim.AdamW:
    """AdamW; the layers a run adds (and training-only ``helpers``) learn at ``lr``, a pretrained
    backbone at ``lr * backbone_lr_scale``."""
    new = {id(p) for p in [*new_layer_parameters(model), *helpers]}
    trainable = [p for p in [*model.parameters(), *helpers] if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if id(p) in new], "lr": cfg.lr},
        {"params": [p for p in trainable if id(p) not in new], "lr": cfg.lr * cfg.backbone_lr_scale},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay)


def _on_device(batch: torch.Tensor, runtime: Runtime) -> torch.Tensor | None:
    """A batch part on the training device; None for an empty placeholder (no teacher, no mask)."""
    return batch.to(runtime.device, non_blocking=runtime.pin_memory) if batch.numel() else None


LOSS_KEYS = ("loss", "ce", "kd", "at", "mask", "feature")


def _feature_width(train_set: Dataset) -> int:
    """Width of the teacher features a view bank carries (0: none)."""
    features = getattr(train_set, "teacher_features", None)
    return 0 if features is None else int(features.shape[-1])


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
    runtime: Runtime = CPU,
) -> FitResult:
    """Train ``model`` (KD when the dataset yields teacher logits), keeping the best
    validation state (balanced accuracy, then lower validation loss); on ``runtime``'s device,
    with its mixed precision, and data-parallel over its ranks (``cfg.batch_size`` is the global
    batch). Returns with the model on the CPU."""
    work_dir.mkdir(parents=True, exist_ok=True)
    state_path = work_dir / "last.pt"
    seed_everything(cfg.seed)
    model.to(runtime.device, memory_format=torch.channels_last if runtime.channels_last else torch.preserve_format)
    weights = class_weights_for(train_labels) if cfg.class_weighting else None
    distiller = Distiller(
        model,
        None,
        cfg.alpha,
        cfg.kd_temperature,
        weights,
        cfg.label_smoothing,
        cfg.freeze_batchnorm,
        cfg.attention_weight,
        cfg.mask_weight,
        cfg.feature_weight,
        _feature_width(train_set),
    ).to(runtime.device)
    if cfg.keep not in ("best", "last"):
        raise ValueError(f"keep must be 'best' or 'last', got {cfg.keep!r}")
    per_rank_batch = runtime.per_rank_batch(cfg.batch_size)
    helpers = [] if distiller.projector is None else list(distiller.projector.parameters())
    optimizer = _optimizer_for(model, cfg, helpers)
    sampler = DistributedSampler(
        train_set, runtime.world_size, runtime.rank, shuffle=True, seed=cfg.seed * 1000, drop_last=runtime.distributed
    )
    steps_per_epoch = math.ceil(len(sampler) / per_rank_batch)
    total_steps, warmup = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, total_steps, warmup))
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.grad_scaling)
    result = FitResult({k: v.clone() for k, v in model.state_dict().items()}, 0, (-1.0, 0.0))
    start_epoch = 1
    if resume and state_path.is_file():
        try:
            saved: dict[str, Any] = load_tensor_file(state_path)
        except WeightsError as exc:
            raise WeightsError(f"cannot resume from {state_path}: {exc}; delete it or run without --resume") from exc
        model.load_state_dict(saved["model"])
        if distiller.projector is not None:
            distiller.projector.load_state_dict(saved["projector"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if "scaler" in saved:
            scaler.load_state_dict(saved["scaler"])
        result = FitResult(saved["best_state"], saved["best_epoch"], tuple(saved["best_score"]), saved["history"])
        start_epoch = saved["epoch"] + 1
        if runtime.is_main:
            print(f"[{desc}] resumed after epoch {saved['epoch']}")
    trainer: nn.Module = distiller
    if runtime.distributed:  # gradients averaged over ranks; rank 0's weights broadcast first
        trainer = DistributedDataParallel(
            distiller, device_ids=[runtime.local_rank] if runtime.device.type == "cuda" else None
        )
    if runtime.is_main:
        print(f"[{desc}] {describe(runtime, cfg.batch_size, cfg.lr)}", flush=True)
    stale = start_epoch - 1 - result.best_epoch
    for epoch in range(start_epoch, cfg.epochs + 1):
        if cfg.keep == "best" and stale >= cfg.patience:
            if runtime.is_main:
                print(f"[{desc}] early stop: no validation gain for {cfg.patience} epochs")
            break
        seed_everything(cfg.seed * 1000 + epoch)  # per-epoch seeding makes --resume exact
        sampler.set_epoch(epoch)
        if isinstance(train_set, FixedViewBank):
            train_set.set_epoch(cfg.seed * 1000 + epoch)
        loader = DataLoader(
            train_set,
            batch_size=per_rank_batch,
            sampler=sampler,
            drop_last=len(train_set) > cfg.batch_size,
            num_workers=runtime.workers,
            pin_memory=runtime.pin_memory,
        )
        distiller.train()
        started, sums, count = time.time(), dict.fromkeys(LOSS_KEYS, 0.0), 0
        bar = tqdm(loader, desc=f"[{desc}] epoch {epoch}/{cfg.epochs}", leave=False, disable=not runtime.is_main)
        for images, targets, teacher_logits, teacher_attention, masks, teacher_features in bar:
            inputs = to_model_input(preprocess, _on_device(images, runtime), runtime.channels_last)
            with runtime.autocast():
                losses = trainer(
                    inputs,
                    _on_device(targets, runtime),
                    _on_device(teacher_logits, runtime),
                    _on_device(teacher_attention, runtime),
                    _on_device(masks, runtime),
                    _on_device(teacher_features, runtime),
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(losses["loss"]).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            for key in sums:
                sums[key] += losses[key].item() * len(targets)
            count += len(targets)
            bar.set_postfix(loss=f"{sums['loss'] / count:.3f}")
        *totals, count = sum_across_ranks(runtime, [*sums.values(), float(count)])
        sums = dict(zip(LOSS_KEYS, totals))
        scores = validation_scores(model, val_images, val_labels, preprocess) if runtime.is_main else None
        row = {
            "epoch": epoch,
            **{f"train_{key}": sums[key] / count for key in LOSS_KEYS},
            "lr": scheduler.get_last_lr()[0],
            **from_main(runtime, scores),  # every rank decides on rank 0's numbers
            "seconds": time.time() - started,
        }
        result.history.append(row)
        score = (row["val_balanced_accuracy"], -row["val_loss"])
        improved = score > result.best_score if cfg.keep == "best" else True
        if improved:
            result.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            result.best_epoch, result.best_score, stale = epoch, score, 0
        else:
            stale += 1
        if runtime.is_main:
            print(
                f"[{desc}] epoch {epoch}: loss {row['train_loss']:.3f} val_loss {row['val_loss']:.3f} "
                f"val_bacc {row['val_balanced_accuracy']:.3f} val_acc {row['val_accuracy']:.3f} "
                f"({row['seconds']:.0f}s){' *best*' if improved else ''}",
                flush=True,
            )
            save_tensor_file(
                {
                    "model": model.state_dict(),
                    **({} if distiller.projector is None else {"projector": distiller.projector.state_dict()}),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "epoch": epoch,
                    "best_state": result.best_state,
                    "best_epoch": result.best_epoch,
                    "best_score": list(result.best_score),
                    "history": result.history,
                },
                state_path,
            )
        barrier(runtime)  # the epoch's state is on disk before any rank moves on
    model.load_state_dict(result.best_state)
    model.to("cpu")
    result.best_state = {k: v.cpu() for k, v in result.best_state.items()}
    return result
