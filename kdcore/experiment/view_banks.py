"""The students' fixed view banks, cached; unlabeled in-domain frames joined to them as extra
function-matching inputs, their targets the teacher's own probabilities."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from kdcore.config import TrainConfig
from kdcore.data import DataIntegrityError, resize_all
from kdcore.engine import ViewBank, build_view_bank
from kdcore.experiment.teacher_outputs import ViewOutputs, cached_tensors, teacher_view_outputs
from kdcore.hashing import sha256_file
from kdcore.imaging import IMAGE_SUFFIXES, read_grey_image
from kdcore.runtime import CPU
from kdcore.transforms import UltrasoundAugment

BANK_SEED = 12345  # the same views for every student, KD or not: a fair ablation


def cached_bank(
    images: torch.Tensor,
    labels: torch.Tensor,
    masks: torch.Tensor | None,
    image_keys: list[str] | None,
    train_cfg: TrainConfig,
    cache: Path,
) -> ViewBank:
    """``build_view_bank`` of (N, 1, S, S) images with ``train_cfg``'s views, built once per
    (images, labels, masks, augmentation, views) and cached in ``cache``."""
    settings = (train_cfg.augment, train_cfg.views_per_image, train_cfg.mixup_views, train_cfg.mixup_alpha, BANK_SEED)
    digest = hashlib.sha256(repr((settings, image_keys)).encode())
    for tensor in (images, labels, *([masks] if masks is not None else [])):
        digest.update(tensor.numpy().tobytes())
    cache_file = cache / f"view_bank_{digest.hexdigest()[:16]}.pt"

    def compute() -> dict[str, torch.Tensor]:
        augment = UltrasoundAugment(train_cfg.augment, images.shape[-1])
        bank = build_view_bank(
            images, labels, augment, train_cfg.views_per_image, BANK_SEED,
            train_cfg.mixup_views, train_cfg.mixup_alpha, masks, image_keys,
        )  # fmt: skip
        plain = torch.tensor(bank.plain_views)
        return {"views": bank.views, "targets": bank.targets, "plain_views": plain} | (
            {"masks": bank.masks} if bank.masks is not None else {}
        )

    saved = cached_tensors(cache_file, compute, ("views", "targets", "plain_views"), "view-bank")
    return ViewBank(saved["views"], saved["targets"], saved.get("masks"), int(saved["plain_views"]))


def frame_images(folder: Path, size: int) -> tuple[torch.Tensor, list[str]]:
    """(N, 1, size, size) uint8 frames of every image file under ``folder`` (sorted, sub-folders
    included; videos and other files skipped) and their sha256; a clear error when there is none
    or one cannot be read."""
    if not folder.is_dir():
        raise DataIntegrityError(f"unlabeled frames: folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataIntegrityError(f"unlabeled frames: no image file ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return resize_all([read_grey_image(p) for p in files], size), [sha256_file(p) for p in files]


def with_unlabeled_frames(
    bank: ViewBank,
    outputs: ViewOutputs,
    teacher_path: Path,
    train_cfg: TrainConfig,
    attention_side: int,
    cache: Path,
    device: torch.device = CPU.device,
) -> tuple[ViewBank, ViewOutputs]:
    """The bank and the teacher's ``outputs`` on it with ``train_cfg.unlabeled_frames`` joined: each frame
    gets the labelled images' kind of views (plain, augmented, mixups with another frame), no
    lesion mask, and the teacher's probabilities on each view as its target, so on frames the
    student only matches the teacher's function (Beyer et al., CVPR 2022)."""
    images, keys = frame_images(Path(train_cfg.unlabeled_frames), bank.views.shape[-1])
    unknown = torch.zeros(len(images), dtype=torch.long)  # placeholder labels: replaced below
    frames = cached_bank(images, unknown, None, keys, train_cfg, cache)
    on_frames = teacher_view_outputs(teacher_path, frames, cache, attention_side, device, outputs.features is not None)
    frames_masks = None if bank.masks is None else torch.zeros_like(frames.views)
    joined = ViewBank(
        torch.cat([bank.views, frames.views]),
        torch.cat([bank.targets, on_frames.logits.softmax(dim=-1)]),
        None if bank.masks is None else torch.cat([bank.masks, frames_masks]),
        bank.plain_views,
    )
    features = None if outputs.features is None else torch.cat([outputs.features, on_frames.features])
    joined_outputs = ViewOutputs(
        torch.cat([outputs.logits, on_frames.logits]), torch.cat([outputs.attention, on_frames.attention]), features
    )
    return joined, joined_outputs
