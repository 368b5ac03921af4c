"""Unlabeled in-domain frames as extra distillation inputs: views, targets, wiring, errors."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from kdcore.config import DEFAULT_SPLIT_FILE, OFFLINE, scratch_recipe
from kdcore.data import DataIntegrityError
from kdcore.experiment import protocol
from kdcore.experiment.protocol import cached_view_bank, load_busi, train_student
from kdcore.experiment.teacher_outputs import teacher_view_outputs
from kdcore.experiment.view_banks import frame_images, with_unlabeled_frames
from kdcore.imaging import ImageReadError

SIZE = 64
FRAMES = 3


@pytest.fixture()
def frames(tmp_path) -> Path:
    """A folder of three speckle frames in a sub-folder, beside a video and a text file."""
    folder = tmp_path / "frames"
    (folder / "clip").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(FRAMES):
        cv2.imwrite(str(folder / "clip" / f"frame_{i}.png"), rng.integers(0, 255, (90, 80), dtype=np.uint8))
    (folder / "clip.mp4").write_bytes(b"not decoded")
    (folder / "notes.txt").write_text("not an image")
    return folder


def _recipe(frames: Path):
    return replace(OFFLINE.student_train, views_per_image=2, mixup_views=1, unlabeled_frames=str(frames))


def test_frames_join_the_bank_with_the_teachers_probabilities_as_targets(busi_dir, tiny_checkpoints, frames, tmp_path):
    data = load_busi(busi_dir, DEFAULT_SPLIT_FILE, subset=6)
    cfg, cache, teacher = _recipe(frames), tmp_path / "cache", tiny_checkpoints["teacher"]
    bank = cached_view_bank(data, SIZE, cfg, cache)
    outputs = teacher_view_outputs(teacher, bank, cache, 3)
    logits, attention, _ = outputs
    joined, (joined_logits, joined_attention, joined_features) = with_unlabeled_frames(
        bank, outputs, teacher, cfg, 3, cache
    )
    n = len(bank.views)
    assert joined.views.shape == (n + FRAMES, *bank.views.shape[1:])
    assert torch.equal(joined.views[:n], bank.views) and torch.equal(joined.targets[:n], bank.targets)
    assert torch.equal(joined_logits[:n], logits) and torch.equal(joined_attention[:n], attention)
    assert outputs.features is None and joined_features is None  # a hybrid teacher has no pooled features
    assert torch.equal(joined.views[n:, 0], frame_images(frames, SIZE)[0])  # each frame's plain view is the frame
    assert not torch.equal(joined.views[n:, 1], joined.views[n:, 0])  # then augmented and mixup views
    assert torch.allclose(joined.targets[n:], joined_logits[n:].softmax(dim=-1))  # the teacher's own verdict
    assert joined.masks is not None and torch.equal(joined.masks[:n], bank.masks) and not joined.masks[n:].any()

    cached = sorted(cache.iterdir())
    again = with_unlabeled_frames(bank, outputs, teacher, cfg, 3, cache)
    assert sorted(cache.iterdir()) == cached  # views and teacher outputs of the frames were cached
    assert torch.equal(again[0].views, joined.views) and torch.equal(again[1].logits, joined_logits)


def test_the_student_trains_on_labelled_images_and_frames(busi_dir, tiny_checkpoints, frames, tmp_path, monkeypatch):
    data = load_busi(busi_dir, DEFAULT_SPLIT_FILE, subset=6)
    seen = []
    monkeypatch.setattr(protocol, "fit", lambda model, train_set, *args, **kwargs: seen.append(train_set) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        train_student(
            OFFLINE.student, replace(OFFLINE.student_preprocess, input_size=SIZE), _recipe(frames), data,
            tmp_path / "student", tiny_checkpoints["teacher"],
        )  # fmt: skip
    (train_set,) = seen
    labelled = len(data.records["train"])
    assert len(train_set) == labelled + FRAMES
    view, target, teacher_logits, _, mask, _ = train_set[labelled]  # a frame
    assert view.shape == (1, SIZE, SIZE) and not mask.any()
    assert torch.allclose(target, teacher_logits.softmax(dim=-1))


def test_frames_need_a_teacher(busi_dir, frames, tmp_path):
    data = load_busi(busi_dir, DEFAULT_SPLIT_FILE, subset=6)
    with pytest.raises(ValueError, match="need a teacher"):
        train_student(OFFLINE.student, OFFLINE.student_preprocess, _recipe(frames), data, tmp_path / "s", None)
    assert not (tmp_path / "work").exists()  # refused before any work
    with_frames = replace(OFFLINE, scratch_train=_recipe(frames))
    assert scratch_recipe(with_frames).unlabeled_frames == ""  # the scratch ablation drops them


def test_feature_matching_needs_a_feature_ensemble_teacher(busi_dir, tiny_checkpoints, tmp_path):
    data = load_busi(busi_dir, DEFAULT_SPLIT_FILE, subset=6)
    recipe = replace(OFFLINE.student_train, feature_weight=1.0)
    for teacher in (None, tiny_checkpoints["teacher"]):  # no teacher; a hybrid teacher (no pooled features)
        with pytest.raises(ValueError, match="needs a feature-ensemble teacher"):
            train_student(OFFLINE.student, OFFLINE.student_preprocess, recipe, data, tmp_path / "s", teacher)
    assert not (tmp_path / "work").exists()  # refused before any view or teacher output was computed
    assert scratch_recipe(replace(OFFLINE, scratch_train=recipe)).feature_weight == 0  # the ablation drops it


def test_a_bad_frames_folder_gets_a_clear_message(frames, tmp_path):
    with pytest.raises(DataIntegrityError, match="folder not found"):
        frame_images(tmp_path / "missing", SIZE)
    empty = tmp_path / "videos_only"
    empty.mkdir()
    (empty / "clip.mp4").write_bytes(b"x")
    with pytest.raises(DataIntegrityError, match="no image file"):
        frame_images(empty, SIZE)
    (frames / "clip" / "frame_9.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ImageReadError, match="frame_9.png"):
        frame_images(frames, SIZE)
