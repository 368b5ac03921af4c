"""The training engine: resumable and reproducible, best state chosen on validation only."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_models import TINY_STUDENT, TINY_TEACHER

from kdcore import engine
from kdcore.checkpoint import load_checkpoint
from kdcore.config import AugmentConfig, PreprocessConfig, TrainConfig
from kdcore.engine import FixedViewBank, OnlineAugmented, ViewBank, class_weights_for, fit, validation_scores
from kdcore.experiment.protocol import BusiData, train_student, train_teacher
from kdcore.models import build_model
from kdcore.transforms import Preprocess, UltrasoundAugment

SIZE = 48


CFG = TrainConfig(epochs=2, batch_size=8, lr=3e-3, warmup_epochs=1, patience=5, seed=3)


def _synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 1, S, S) uint8 images whose brightness depends on the class, and the labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    base = (60 + 60 * labels).view(n, 1, 1, 1).float()
    images = (base + 25 * torch.randn(n, 1, SIZE, SIZE, generator=g)).clamp(0, 255).to(torch.uint8)
    return images, labels


@pytest.fixture(scope="module")
def data():
    train_images, train_labels = _synthetic(24, 0)
    val_images, val_labels = _synthetic(9, 1)
    g = torch.Generator().manual_seed(2)
    views = torch.stack([train_images, 255 - train_images, train_images // 2], dim=1)  # (N, V=3, 1, S, S)
    teacher_logits = torch.randn(24, 3, 3, generator=g)
    return train_images, train_labels, val_images, val_labels, views, teacher_logits


def _fit(data, work_dir: Path, resume: bool = False, cfg: TrainConfig = CFG, model_seed: int = 0):
    train_images, train_labels, val_images, val_labels, views, teacher_logits = data
    torch.manual_seed(model_seed)
    model = build_model(TINY_STUDENT, SIZE)
    targets = F.one_hot(train_labels, 3).float()[:, None].expand(-1, views.shape[1], -1)
    features = torch.randn(*views.shape[:2], 16, generator=torch.Generator().manual_seed(5))
    train_set = FixedViewBank(ViewBank(views, targets), teacher_logits, None, features if cfg.feature_weight else None)
    preprocess = Preprocess(PreprocessConfig(input_size=SIZE))
    result = fit(model, train_set, val_images, val_labels, train_labels, preprocess, cfg, work_dir, resume, "t")
    return model, result


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("cfg", [CFG, replace(CFG, feature_weight=1.0)], ids=["logits", "logits+features"])
def test_resume_continues_from_the_saved_epoch_and_matches_an_uninterrupted_run(data, tmp_path, monkeypatch, cfg):
    full_model, full = _fit(data, tmp_path / "full", cfg=cfg)
    assert (tmp_path / "full" / "last.pt").is_file()
    assert [h["epoch"] for h in full.history] == [1, 2]
    assert all(h["train_kd"] > 0 for h in full.history)  # the cached teacher logits were used
    assert all((h["train_feature"] > 0) == bool(cfg.feature_weight) for h in full.history)  # and features if asked

    # Same run, killed during epoch 2 (after epoch 1 was saved).
    real_scores, calls = engine.validation_scores, []

    def dies_in_epoch_two(*args):
        calls.append(1)
        if len(calls) == 2:
            raise Interrupted
        return real_scores(*args)

    monkeypatch.setattr(engine, "validation_scores", dies_in_epoch_two)
    with pytest.raises(Interrupted):
        _fit(data, tmp_path / "cut", cfg=cfg)
    monkeypatch.setattr(engine, "validation_scores", real_scores)
    saved = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert saved["epoch"] == 1 and ("projector" in saved) == bool(cfg.feature_weight)  # the training-only projector

    # Resume with a differently initialised model: everything must come from last.pt.
    resumed_model, resumed = _fit(data, tmp_path / "cut", resume=True, cfg=cfg, model_seed=99)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    for a, b in zip(full.history, resumed.history):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    last_full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model"]
    last_resumed = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["model"]
    for key in last_full:
        assert torch.equal(last_full[key], last_resumed[key]), key
    for key, value in full_model.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[key]), key


def test_same_seed_same_weights_other_seed_other_weights(data, tmp_path):
    one_cfg = replace(CFG, epochs=1)
    a, _ = _fit(data, tmp_path / "a", cfg=one_cfg)
    b, _ = _fit(data, tmp_path / "b", cfg=one_cfg)
    c, _ = _fit(data, tmp_path / "c", cfg=replace(one_cfg, seed=4))
    key = "conv_stem.weight"
    assert torch.equal(a.state_dict()[key], b.state_dict()[key])
    assert not torch.equal(a.state_dict()[key], c.state_dict()[key])


def test_returned_model_is_the_best_validation_epoch(data, tmp_path):
    cfg = replace(CFG, epochs=3, lr=2e-2)  # a large lr makes the epochs differ
    model, result = _fit(data, tmp_path / "best", cfg=cfg)
    scores = [(h["val_balanced_accuracy"], -h["val_loss"]) for h in result.history]
    assert result.best_epoch == 1 + max(range(len(scores)), key=lambda i: scores[i])
    assert result.best_score == scores[result.best_epoch - 1]
    # The weights handed back reproduce that epoch's validation numbers exactly.
    _, _, val_images, val_labels, _, _ = data
    again = validation_scores(model, val_images, val_labels, Preprocess(PreprocessConfig(input_size=SIZE)))
    best_row = result.history[result.best_epoch - 1]
    for key, value in again.items():
        assert value == pytest.approx(best_row[key], abs=1e-6), key


def test_early_stopping_after_patience_epochs_without_gain(data, tmp_path):
    cfg = replace(CFG, epochs=6, patience=1, lr=0.0)  # lr 0: no epoch can beat the first one
    _, result = _fit(data, tmp_path / "stop", cfg=cfg)
    assert result.best_epoch == 1
    assert len(result.history) == 2


def test_fixed_view_bank_returns_the_teacher_logits_of_the_view_it_returns():
    n, v = 5, 4
    views = torch.zeros(n, v, 1, 8, 8, dtype=torch.uint8)
    logits = torch.zeros(n, v, 3)
    for i in range(n):
        for j in range(v):
            views[i, j] = 10 * i + j  # each view carries its own (image, view) code
            logits[i, j] = torch.tensor([i, j, 10 * i + j], dtype=torch.float32)
    targets = torch.zeros(n, v, 3)
    attention = torch.zeros(n, v, 4)
    for i in range(n):
        for j in range(v):
            targets[i, j, (i + j) % 3] = 1.0  # each view has its own target, too
            attention[i, j] = 10 * i + j
    features = torch.arange(n * v, dtype=torch.float32).reshape(n, v, 1).expand(-1, -1, 5)
    bank = FixedViewBank(ViewBank(views, targets), logits, attention, features)
    assert len(bank) == n
    seen = set()
    for epoch in range(20):
        bank.set_epoch(epoch)
        first_pick = [int(bank[i][0][0, 0, 0]) for i in range(n)]
        assert [int(bank[i][0][0, 0, 0]) for i in range(n)] == first_pick  # one view per image and epoch
        for i in range(n):
            image, target, teacher, looks, _, teacher_features = bank[i]
            code = int(image[0, 0, 0])
            j = code - 10 * i
            assert (teacher_features == i * v + j).all()  # the features of that view too
            assert image.shape == (1, 8, 8) and (image == code).all()
            assert teacher.tolist() == [i, j, code] and (looks == code).all()
            assert target.argmax().item() == (i + j) % 3
            seen.add((i, j))
    assert {j for _, j in seen} == set(range(v))  # every view gets used
    # Without a teacher the teacher parts are empty, which the engine reads as "no KD".
    _, _, no_logits, no_attention, no_mask, no_features = FixedViewBank(ViewBank(views, targets), None)[0]
    assert no_logits.numel() == 0 and no_attention.numel() == 0 and no_mask.numel() == 0 and no_features.numel() == 0


def test_online_augmented_yields_fresh_views_and_no_teacher_outputs():
    images, labels = _synthetic(2, 0)
    data = OnlineAugmented(images, labels, UltrasoundAugment(AugmentConfig(), SIZE))
    torch.manual_seed(0)
    a, label, logits, attention, _, features = data[0]
    b, *_ = data[0]
    assert a.shape == images[0].shape and a.dtype == torch.uint8 and label == labels[0]
    assert not torch.equal(a, b) and logits.numel() == 0 and attention.numel() == 0 and features.numel() == 0


def test_class_weights_favour_the_rare_class():
    weights = class_weights_for(torch.tensor([0] * 6 + [1] * 3 + [2] * 1))
    assert weights.mean().item() == pytest.approx(1.0)
    assert weights[2] > weights[1] > weights[0]
    assert (weights[0] / weights[2]).item() == pytest.approx(1 / 6)


class _Untouchable:
    """Stands in for the test split: any use of it fails the test."""

    def __getattr__(self, name):
        raise AssertionError("the test split was used during training")

    def __len__(self):
        raise AssertionError("the test split was used during training")

    def __getitem__(self, key):
        raise AssertionError("the test split was used during training")

    def __iter__(self):
        raise AssertionError("the test split was used during training")


def _greys(images: torch.Tensor) -> list:
    """(N, 1, S, S) uint8 -> the HxW grey arrays ``BusiData`` holds."""
    return [image[0].numpy() for image in images]


def test_training_and_model_selection_never_touch_the_test_split(data, tmp_path):
    train_images, train_labels, val_images, val_labels, _, _ = data
    busi = BusiData(
        root=tmp_path,
        split_sha256="0" * 64,
        records={"train": [], "val": [], "test": _Untouchable()},
        labels={"train": train_labels, "val": val_labels, "test": _Untouchable()},
        greys={"train": _greys(train_images), "val": _greys(val_images), "test": _Untouchable()},
    )
    preprocess = PreprocessConfig(input_size=SIZE, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    teacher_path = train_teacher(TINY_TEACHER, preprocess, replace(CFG, epochs=2), busi, tmp_path / "teacher")
    student_cfg = replace(CFG, epochs=2, views_per_image=2)
    student_path = train_student(
        TINY_STUDENT, PreprocessConfig(input_size=SIZE), student_cfg, busi, tmp_path / "student", teacher_path
    )
    for path, role in ((teacher_path, "teacher"), (student_path, "student_kd")):
        model, meta = load_checkpoint(path)
        assert meta.role == role
        assert meta.split_sha256 == "0" * 64
        best = meta.history[meta.best_epoch - 1]
        assert meta.validation == best  # the recorded score is the validation score of the kept epoch
        assert set(meta.validation) >= {"val_loss", "val_accuracy", "val_balanced_accuracy"}
        assert "test" not in json.dumps({"validation": meta.validation, "history": meta.history})
        assert meta.calibration_temperature > 0
    assert meta.teacher_weights_sha256 == json.loads(teacher_path.with_suffix(".json").read_text())["weights_sha256"]
    # The teacher's logits on the fixed views were cached for the next student.
    assert list((tmp_path / "work").glob("teacher_outputs_*.pt"))


class _Stop(Exception):
    pass


def _initial_weights(monkeypatch, train, **kwargs) -> torch.Tensor:
    """conv_stem weights of the model that ``train`` hands to ``fit`` (training itself is skipped)."""
    from kdcore.experiment import protocol

    seen = []

    def capture(model, *args, **kw):
        stem = model.cnn.conv_stem if hasattr(model, "cnn") else model.conv_stem
        seen.append(stem.weight.detach().clone())
        raise _Stop

    monkeypatch.setattr(protocol, "fit", capture)
    with pytest.raises(_Stop):
        train(**kwargs)
    return seen[0]


def test_initial_weights_follow_the_seed(data, tmp_path, monkeypatch):
    """Student seeds must differ in their initial weights (the view bank re-seeds the RNG), and a
    seed must give the same init whatever used the RNG before (resumed `all` runs)."""
    train_images, train_labels, val_images, val_labels, _, _ = data
    busi = BusiData(
        tmp_path,
        "0" * 64,
        {},
        {"train": train_labels, "val": val_labels},
        {"train": _greys(train_images), "val": _greys(val_images)},
    )

    def student(seed: int) -> torch.Tensor:
        cfg = replace(CFG, seed=seed, views_per_image=2)
        kwargs = dict(model_cfg=TINY_STUDENT, preprocess_cfg=PreprocessConfig(input_size=SIZE), train_cfg=cfg)
        return _initial_weights(
            monkeypatch, train_student, **kwargs, data=busi, out_path=tmp_path / "s", teacher_path=None
        )

    def teacher(seed: int) -> torch.Tensor:
        kwargs = dict(
            model_cfg=TINY_TEACHER, preprocess_cfg=PreprocessConfig(input_size=SIZE), train_cfg=replace(CFG, seed=seed)
        )
        return _initial_weights(monkeypatch, train_teacher, **kwargs, data=busi, out_path=tmp_path / "t")

    for train in (student, teacher):
        first = train(0)
        torch.rand(1000)  # unrelated RNG use in between
        assert torch.equal(train(0), first)
        assert not torch.equal(train(1), first)


def test_teacher_outputs_resume_after_an_interruption(tiny_checkpoints, tmp_path, monkeypatch):
    """A killed run keeps the blocks it finished; the rerun computes only the rest, same result."""
    from kdcore.experiment import teacher_outputs as protocol

    views = ViewBank(torch.randint(0, 255, (5, 2, 1, 64, 64), dtype=torch.uint8), torch.zeros(5, 2, 3))
    teacher = tiny_checkpoints["teacher"]
    expected, expected_attention, _ = protocol.teacher_view_outputs(teacher, views, tmp_path / "a", 3)
    monkeypatch.setattr(protocol, "PARTIAL_EVERY_VIEWS", 4)
    real, calls, killed = protocol.teacher_outputs, [], []

    def interrupted(*args, **kwargs):
        calls.append(len(args[1]))
        if len(calls) == 2 and not killed:
            killed.append(True)
            raise _Stop()
        return real(*args, **kwargs)

    monkeypatch.setattr(protocol, "teacher_outputs", interrupted)
    with pytest.raises(_Stop):
        protocol.teacher_view_outputs(tiny_checkpoints["teacher"], views, tmp_path / "b", 3)
    assert len(list((tmp_path / "b").glob("*.partial.pt"))) == 1  # the first block of 4 views was kept
    calls.clear()
    logits, attention, _ = protocol.teacher_view_outputs(tiny_checkpoints["teacher"], views, tmp_path / "b", 3)
    assert calls == [4, 2]  # views 5-8, then 9-10: the first block was not recomputed
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(attention, expected_attention)
    assert not list((tmp_path / "b").glob("*.partial.pt"))
