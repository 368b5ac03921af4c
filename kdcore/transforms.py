"""THE preprocessing, built from a model's config and shared by training, evaluation,
the app and export; plus the training-only ultrasound augmentation."""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from kdcore.config import AugmentConfig, PreprocessConfig


def resize_grey(grey: np.ndarray, size: int) -> np.ndarray:
    """HxW uint8 -> size x size uint8 (area interpolation, aspect squashed as in the paper)."""
    interpolation = cv2.INTER_AREA if min(grey.shape[:2]) >= size else cv2.INTER_LINEAR
    return cv2.resize(grey, (size, size), interpolation=interpolation)


def resize_views(views: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 1, S, S) uint8 views -> (B, 1, size, size) uint8 (antialiased bilinear): the same view
    at another model's input size."""
    return v2.functional.resize(views, [size, size], antialias=True)


class Preprocess:
    """grey uint8 image -> normalised float tensor (3, S, S); callable on batches too."""

    def __init__(self, cfg: PreprocessConfig) -> None:
        self.cfg = cfg
        self._mean = torch.tensor(cfg.mean).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(cfg.std).view(1, 3, 1, 1) * 255.0

    def resize(self, grey: np.ndarray) -> torch.Tensor:
        """HxW uint8 -> (1, S, S) uint8 tensor: the cacheable part."""
        return torch.from_numpy(resize_grey(grey, self.cfg.input_size)).unsqueeze(0)

    def normalize(self, small: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) or (1, S, S) uint8 -> float, grey replicated to 3 channels, normalised."""
        batch = small.unsqueeze(0) if small.dim() == 3 else small
        mean, std = self._mean.to(batch.device), self._std.to(batch.device)
        out = (batch.float().expand(-1, 3, -1, -1) - mean) / std
        return out if small.dim() == 4 else out[0]

    def __call__(self, grey: np.ndarray) -> torch.Tensor:
        return self.normalize(self.resize(grey))


class UltrasoundAugment:
    """Random crop/zoom, flip, small rotation, gain/contrast and multiplicative speckle.

    Works on (1, S, S) uint8 tensors and returns the same, so it slots between
    ``Preprocess.resize`` and ``Preprocess.normalize``.
    """

    def __init__(self, cfg: AugmentConfig, size: int) -> None:
        self.cfg = cfg
        ops: list[v2.Transform] = [
            v2.RandomResizedCrop(size, scale=cfg.crop_scale, ratio=cfg.crop_ratio, antialias=True)
        ]
        if cfg.hflip:
            ops.append(v2.RandomHorizontalFlip())
        if cfg.rotate_degrees:
            ops.append(v2.RandomRotation(cfg.rotate_degrees))
        if cfg.brightness or cfg.contrast:
            ops.append(v2.ColorJitter(brightness=cfg.brightness, contrast=cfg.contrast))
        self.geometry_and_gain = v2.Compose(ops)

    def __call__(self, small: torch.Tensor) -> torch.Tensor:
        return self._speckle(self.geometry_and_gain(small))

    def with_mask(self, small: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The image and its lesion mask under the same geometry; gain and speckle touch the image only."""
        image, moved = self.geometry_and_gain(tv_tensors.Image(small), tv_tensors.Mask(mask))
        return self._speckle(image.as_subclass(torch.Tensor)), moved.as_subclass(torch.Tensor)

    def _speckle(self, out: torch.Tensor) -> torch.Tensor:
        if self.cfg.speckle_sigma:
            noise = 1.0 + self.cfg.speckle_sigma * torch.randn(out.shape)
            out = (out.float() * noise).clamp(0, 255).round().to(torch.uint8)
        return out
