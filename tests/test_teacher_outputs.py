"""Teacher outputs on a student's views: a feature-ensemble teacher's backbone outputs on each
image's plain views are stored once and shared by the folds, the result is exactly the whole
teacher's, a cache without what the teacher gives is computed anew, and unasked-for features are
not kept."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_engine import SIZE
from test_probe import probe_teacher  # noqa: F401 (fixture)

from kdcore.checkpoint import load_checkpoint
from kdcore.config import AugmentConfig
from kdcore.engine import build_view_bank
from kdcore.experiment import teacher_outputs as outputs
from kdcore.transforms import Preprocess, UltrasoundAugment

ATTENTION_SIDE = 3


def _fold_banks():
    torch.manual_seed(0)
    images = torch.randint(0, 255, (6, 1, SIZE, SIZE), dtype=torch.uint8)
    labels, keys = torch.tensor([0, 1, 2, 0, 1, 2]), [f"sha-{i}" for i in range(6)]
    augment = UltrasoundAugment(AugmentConfig(), SIZE)
    fold_a = build_view_bank(images[:4], labels[:4], augment, 3, 7, 2, 0.4, image_keys=keys[:4])
    fold_b = build_view_bank(images[2:], labels[2:], augment, 3, 7, 2, 0.4, image_keys=keys[2:])
    return fold_a, fold_b


def test_views_seeded_per_image_are_the_same_in_every_fold():
    fold_a, fold_b = _fold_banks()
    assert fold_a.plain_views == fold_b.plain_views == 3
    assert torch.equal(fold_a.views[2:4, :3], fold_b.views[:2, :3])  # images 2 and 3 sit in both folds
    assert not torch.equal(fold_a.views[2, 1], fold_a.views[3, 1])  # and each image has its own draws


def test_shared_store_is_exact_and_serves_the_next_fold(probe_teacher, tmp_path, monkeypatch):  # noqa: F811
    fold_a, fold_b = _fold_banks()
    logits, attention, features = outputs.teacher_view_outputs(probe_teacher, fold_a, tmp_path, ATTENTION_SIDE)
    teacher, meta = load_checkpoint(probe_teacher)
    whole = outputs.teacher_outputs(teacher, fold_a.views.flatten(0, 1), Preprocess(meta.preprocess), ATTENTION_SIDE)
    torch.testing.assert_close(logits.flatten(0, 1), whole["logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention.flatten(0, 1), whole["attention"], atol=1e-5, rtol=1e-5)
    # the features are what the teacher's linear head reads: it turns them into its logits
    assert features.shape == (*fold_a.views.shape[:2], teacher.classifier.in_features)
    torch.testing.assert_close(teacher.classifier(features.flatten(0, 1)), whole["logits"], atol=1e-5, rtol=1e-5)
    assert features.flatten(0, 1).std(0).mean() > 0.1  # standardised, not constant

    real, calls = outputs.teacher_outputs, []

    def counted(teacher, views, *args, **kwargs):
        calls.append(len(views))
        return real(teacher, views, *args, **kwargs)

    monkeypatch.setattr(outputs, "teacher_outputs", counted)
    logits_b, *_ = outputs.teacher_view_outputs(probe_teacher, fold_b, tmp_path, ATTENTION_SIDE)
    assert calls == [2 * 3, 4 * 2]  # the 2 new images' plain views, then fold b's own mixup views
    torch.testing.assert_close(logits_b[:2, :3], logits[2:4, :3])  # shared images: the same outputs
    (store,) = tmp_path.glob("backbone_outputs_*.pt")
    assert len(torch.load(store, weights_only=True)["keys"]) == 6
    calls.clear()
    outputs.teacher_view_outputs(probe_teacher, fold_b, tmp_path, ATTENTION_SIDE)
    assert calls == []  # everything cached now


def test_banks_with_other_view_counts_share_a_cache_folder(probe_teacher, tmp_path):  # noqa: F811
    fold_a, _ = _fold_banks()
    images, labels = fold_a.views[:, 0], fold_a.targets[:, 0].argmax(1)
    augment = UltrasoundAugment(AugmentConfig(), SIZE)
    other = build_view_bank(images, labels, augment, 5, 7, 0, 0.4, image_keys=["x", "y", "z", "w"])
    outputs.teacher_view_outputs(probe_teacher, fold_a, tmp_path, ATTENTION_SIDE)
    logits, *_ = outputs.teacher_view_outputs(probe_teacher, other, tmp_path, ATTENTION_SIDE)
    teacher, meta = load_checkpoint(probe_teacher)
    whole = outputs.teacher_outputs(teacher, other.views.flatten(0, 1), Preprocess(meta.preprocess), ATTENTION_SIDE)
    torch.testing.assert_close(logits.flatten(0, 1), whole["logits"], atol=1e-5, rtol=1e-5)
    stores = sorted(p.name.rsplit("_", 1)[1] for p in tmp_path.glob("backbone_outputs_*.pt"))
    assert stores == ["3views.pt", "5views.pt"]  # one store per view count


@pytest.mark.parametrize("damage", ["truncated", "keys missing"])
def test_damaged_store_and_partial_outputs_are_computed_anew(probe_teacher, tmp_path, capsys, damage):  # noqa: F811
    fold_a, _ = _fold_banks()
    logits, *_ = outputs.teacher_view_outputs(probe_teacher, fold_a, tmp_path, ATTENTION_SIDE)
    (store,) = tmp_path.glob("backbone_outputs_*.pt")
    partial = tmp_path / "teacher_outputs.partial.pt"
    for file in (store, partial):
        if damage == "truncated":
            file.write_bytes(store.read_bytes()[:1000])
        else:
            torch.save({"unrelated": torch.zeros(1)}, file)
    for cache in tmp_path.glob("teacher_outputs_*.pt"):
        cache.unlink()  # the mixup views' cache: their outputs come through the partial file again

    again, *_ = outputs.teacher_view_outputs(probe_teacher, fold_a, tmp_path, ATTENTION_SIDE)
    teacher, meta = load_checkpoint(probe_teacher)
    resumed = outputs.resumable_teacher_outputs(
        teacher, fold_a.views.flatten(0, 1), Preprocess(meta.preprocess), ATTENTION_SIDE, partial
    )

    torch.testing.assert_close(again, logits)
    torch.testing.assert_close(resumed["logits"], logits.flatten(0, 1), atol=1e-5, rtol=1e-5)
    out = capsys.readouterr().out
    assert f"ignoring backbone-output store {store}" in out and f"ignoring partial teacher-output {partial}" in out
    assert not partial.exists() and len(torch.load(store, weights_only=True)["keys"]) == 4


def test_a_save_killed_midway_keeps_the_previous_file(tmp_path, monkeypatch):
    """The store grows for an hour: a run killed while saving it must not lose what it held."""
    from kdcore.models import load_tensor_file, save_tensor_file

    store = tmp_path / "backbone_outputs.pt"
    save_tensor_file({"pooled": torch.ones(2, 3)}, store)
    real_save = torch.save

    def killed(obj, path):
        Path(path).write_bytes(b"PK\x03\x04 half a zip")  # what a kill mid-write leaves
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        save_tensor_file({"pooled": torch.zeros(5, 3)}, store)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(load_tensor_file(store)["pooled"], torch.ones(2, 3))
    save_tensor_file({"pooled": torch.zeros(5, 3)}, store)
    assert load_tensor_file(store)["pooled"].shape == (5, 3) and [p.name for p in tmp_path.iterdir()] == [store.name]


def test_a_cache_without_the_ensembles_pooled_features_is_computed_anew(probe_teacher, tmp_path, capsys):  # noqa: F811
    fold_a, _ = _fold_banks()
    logits, attention, features = outputs.teacher_view_outputs(probe_teacher, fold_a, tmp_path, ATTENTION_SIDE)
    (cache,) = tmp_path.glob("teacher_outputs_*.pt")  # the mixup views' whole-teacher outputs
    saved = torch.load(cache, weights_only=True)
    torch.save({key: saved[key] for key in ("logits", "attention")}, cache)  # "pooled" dropped

    again = outputs.teacher_view_outputs(probe_teacher, fold_a, tmp_path, ATTENTION_SIDE)
    assert f"ignoring teacher-output cache {cache}" in capsys.readouterr().out
    torch.testing.assert_close(again.features, features)
    assert "pooled" in torch.load(cache, weights_only=True)


def test_features_are_dropped_when_not_asked_for(probe_teacher, tmp_path):  # noqa: F811
    fold_a, _ = _fold_banks()
    full = outputs.teacher_view_outputs(probe_teacher, fold_a, tmp_path, ATTENTION_SIDE)
    lean = outputs.teacher_view_outputs(probe_teacher, fold_a, tmp_path, ATTENTION_SIDE, with_features=False)
    assert full.features is not None and lean.features is None
    torch.testing.assert_close(lean.logits, full.logits)
    torch.testing.assert_close(lean.attention, full.attention)
