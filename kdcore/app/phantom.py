"""Synthetic B-mode speckle phantoms with a lesion: example inputs we can ship freely.

Not patient data and not meant to be classified correctly: they exercise the app's image and
video paths without committing any real ultrasound image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np


@dataclass(frozen=True)
class Lesion:
    """An elliptical hypo-echoic region; ``irregularity`` > 0 makes its margin lobulated."""

    centre: tuple[float, float] = (0.5, 0.5)  # (x, y) as fractions of the image
    radii: tuple[float, float] = (0.16, 0.11)
    echogenicity: float = 0.25  # mean brightness relative to the surrounding tissue
    irregularity: float = 0.0
    shadow: float = 0.0  # > 0 darkens the tissue beneath (posterior shadowing)


def speckle_phantom(
    height: int = 360,
    width: int = 480,
    lesion: Lesion | None = None,
    seed: int = 0,
    phase: float = 0.0,
) -> np.ndarray:
    """HxW uint8 image: skin line, speckled tissue with depth attenuation, optional lesion.

    ``phase`` shifts the lesion sideways (fraction of the width) for a sweep clip.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    depth = yy / height
    tissue = 0.75 * np.exp(-1.2 * depth) + 0.1 * np.sin(xx / width * 9 + depth * 4) ** 2
    tissue[yy < height * 0.06] = 1.0  # bright skin line
    if lesion is not None:
        cx, cy = (lesion.centre[0] + phase) * width, lesion.centre[1] * height
        angle = np.arctan2(yy - cy, xx - cx)
        margin = 1.0 + lesion.irregularity * np.sin(7 * angle) * np.cos(3 * angle + 1.0)
        r = np.hypot((xx - cx) / (lesion.radii[0] * width), (yy - cy) / (lesion.radii[1] * height))
        inside = r < margin
        tissue = np.where(inside, tissue * lesion.echogenicity, tissue)
        if lesion.shadow:
            below = (yy > cy) & (np.abs(xx - cx) < lesion.radii[0] * width * 0.8) & ~inside
            tissue = np.where(below, tissue * (1 - lesion.shadow), tissue)
    speckle = rng.rayleigh(1.0, (height, width)).astype(np.float32)
    speckle = cv2.GaussianBlur(speckle, (0, 0), sigmaX=1.2, sigmaY=0.6)  # axial/lateral blur
    image = tissue * speckle * 150
    return np.clip(image, 0, 255).astype(np.uint8)


EXAMPLE_PHANTOMS: dict[str, Lesion | None] = {
    "phantom_round_lesion": Lesion(echogenicity=0.3),
    "phantom_irregular_lesion": Lesion(radii=(0.14, 0.14), echogenicity=0.15, irregularity=0.25, shadow=0.6),
    "phantom_no_lesion": None,
}


def write_example_images(folder: Path) -> list[Path]:
    """One PNG per entry of ``EXAMPLE_PHANTOMS``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (name, lesion) in enumerate(EXAMPLE_PHANTOMS.items()):
        path = folder / f"{name}.png"
        cv2.imwrite(str(path), speckle_phantom(lesion=lesion, seed=index))
        paths.append(path)
    return paths


def write_sweep_clip(path: Path, seconds: float = 2.0, fps: int = 10, size: tuple[int, int] = (320, 240)) -> Path:
    """A short MPEG-4 clip of a probe sweeping across an irregular lesion (fresh speckle per frame)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {path.suffix} video here")
    frames = int(seconds * fps)
    lesion = EXAMPLE_PHANTOMS["phantom_irregular_lesion"]
    try:
        for i in range(frames):
            grey = speckle_phantom(height, width, lesion, seed=100 + i, phase=0.25 * (i / frames - 0.5))
            writer.write(cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR))
    finally:
        writer.release()
    return path
