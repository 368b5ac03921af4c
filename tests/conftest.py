"""Shared fixtures: tiny real-architecture checkpoints (random weights) and paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import TINY_TEACHER

from kdcore.app.patches.upload_cache import use_private_upload_cache
from kdcore.checkpoint import CheckpointMeta, save_checkpoint
from kdcore.config import CLASS_NAMES, DEFAULT_DATA_DIR, OFFLINE, PAPER

BUSI = DEFAULT_DATA_DIR
needs_busi = pytest.mark.skipif(not (BUSI / "manifest.csv").is_file(), reason="BUSI not available")


def pytest_configure(config: pytest.Config) -> None:
    """Apps under test keep uploads in a private folder, never in a running app's /tmp/gradio."""
    use_private_upload_cache()


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """One intra-op torch thread for the whole suite.

    On a shared 2-core machine OpenMP spin-waiting makes 2 threads ~20x slower. Subprocesses
    (e.g. ``train.py`` in test_cli) get ``OMP_NUM_THREADS=1`` in their environment instead.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def busi_dir() -> Path:
    if not (BUSI / "manifest.csv").is_file():
        pytest.skip("BUSI not available")
    return BUSI


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """{'teacher': ..., 'student': ...} checkpoint paths in a session temp folder.

    The student is the real MobileNetV3-Small; the teacher keeps the real hybrid layout on
    a small CNN so that tests stay fast. Weights are random (seeded).
    """
    from kdcore.models import build_model

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("checkpoints")
    paths = {}
    for name, cfg, preprocess in (
        ("teacher", TINY_TEACHER, PAPER.teacher_preprocess),  # the hybrid layout: 224 px
        ("student", OFFLINE.student, OFFLINE.student_preprocess),
    ):
        model = build_model(cfg).eval()
        paths[name] = save_checkpoint(folder / name, model, CheckpointMeta(cfg, preprocess, CLASS_NAMES, role=name))
    return paths


@pytest.fixture()
def speckle_image() -> np.ndarray:
    """A 300x400 synthetic grey speckle image with a dark round 'lesion'."""
    rng = np.random.default_rng(0)
    img = rng.rayleigh(60, (300, 400))
    yy, xx = np.mgrid[:300, :400]
    img[(yy - 150) ** 2 + (xx - 200) ** 2 < 50**2] *= 0.3
    return np.clip(img, 0, 255).astype(np.uint8)
