"""The frozen-ensemble teacher and its linear-probe head: the fit is scikit-learn's
logistic regression, flip averaging and Grad-CAM stay exact, the teacher trains end to end."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from test_engine import SIZE, _greys, _synthetic
from tiny_models import TINY_ENSEMBLE, TINY_TEACHER

from kdcore.cam import grad_cam
from kdcore.checkpoint import load_checkpoint
from kdcore.config import PreprocessConfig, TrainConfig
from kdcore.experiment.protocol import BusiData, train_teacher
from kdcore.inference import load_predictor
from kdcore.models import build_model, map_and_logits
from kdcore.probe import fit_logistic

UNIT = PreprocessConfig(input_size=SIZE, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def test_fit_logistic_is_scikit_learns_balanced_logistic_regression():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 60 + [1] * 25 + [2] * 15)
    features = rng.normal(size=(100, 6)) + labels[:, None] * np.array([0.8, -0.5, 0.0, 0.3, 0.0, 0.1])
    reference = LogisticRegression(C=0.1, class_weight="balanced", tol=1e-10, max_iter=10000).fit(features, labels)
    weight, bias = fit_logistic(torch.tensor(features).float(), torch.tensor(labels), 3, c=0.1)
    np.testing.assert_allclose(weight.numpy(), reference.coef_, atol=2e-4)
    np.testing.assert_allclose(bias.numpy(), reference.intercept_, atol=2e-4)


def test_a_weaker_penalty_fits_the_training_data_more_closely():
    rng = np.random.default_rng(1)
    labels = torch.tensor(rng.integers(0, 3, 80))
    features = torch.tensor(rng.normal(size=(80, 20))).float()
    strong, _ = fit_logistic(features, labels, 3, c=0.001)
    weak, _ = fit_logistic(features, labels, 3, c=10.0)
    assert strong.norm() < 0.2 * weak.norm()


def test_ensemble_joins_its_members_maps_and_flip_average_is_mirror_invariant():
    torch.manual_seed(0)
    model = build_model(replace(TINY_ENSEMBLE, flip_average=True), SIZE).eval()
    x = torch.rand(2, 3, SIZE, SIZE)
    feature_map, logits = map_and_logits(model, x)
    widths = [m.forward_features(torch.zeros(1, 3, SIZE, SIZE)).shape[1] for m in model.members]
    assert feature_map.shape[1] == sum(widths) and logits.shape == (2, 3)
    torch.testing.assert_close(model(x.flip(3)), logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model(x), logits)
    assert not any(p.requires_grad for p in model.members.parameters())  # frozen_blocks=-1
    assert all(p.requires_grad for p in model.classifier.parameters())


def test_frozen_ensemble_grad_cam_of_a_mirrored_image_is_the_mirrored_map(probe_teacher):
    predictor = load_predictor(probe_teacher)
    grey = _greys(_synthetic(3, 5)[0])[2]  # a bright (class 2) picture
    prediction, plain = grad_cam(predictor, grey)
    mirrored_prediction, mirrored = grad_cam(predictor, np.ascontiguousarray(grey[:, ::-1]))
    assert prediction.label == mirrored_prediction.label
    assert plain.shape == (SIZE, SIZE) and plain.max() > 0.99
    np.testing.assert_allclose(mirrored[:, ::-1], plain, atol=1e-3)


def test_members_with_different_feature_grids_are_refused():
    with pytest.raises(ValueError, match="same feature grid"):
        build_model(replace(TINY_ENSEMBLE, ensemble_members=("resnet18",), cnn_name="vit_tiny_patch16_224"), 224)


@pytest.fixture(scope="module")
def probe_teacher(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("probe")
    busi = _tiny_busi(tmp_path)
    cfg = TrainConfig(head_fit="probe", probe_c=1.0, probe_views=2, seed=0)
    return train_teacher(replace(TINY_ENSEMBLE, flip_average=True), UNIT, cfg, busi, tmp_path / "teacher")


def test_probe_teacher_trains_calibrates_and_round_trips(probe_teacher):
    model, meta = load_checkpoint(probe_teacher)
    assert meta.model.ensemble_members == TINY_ENSEMBLE.ensemble_members  # a tuple again after JSON
    assert meta.training.head_fit == "probe" and meta.best_epoch == 0
    assert meta.history[0]["train_samples"] == 30 * 3  # plain + two augmented views (flips are in the model)
    # Brightness separates the synthetic classes: the probe finds it on held-out images.
    assert meta.validation["val_accuracy"] >= 0.9
    assert torch.count_nonzero(model.standardise.running_mean) > 0
    assert json.loads(probe_teacher.with_suffix(".json").read_text())["model_args"]["kind"] == "ensemble"


def _tiny_busi(tmp_path, n_train: int = 30, n_val: int = 12) -> BusiData:
    train_images, train_labels = _synthetic(n_train, 0)
    val_images, val_labels = _synthetic(n_val, 1)
    return BusiData(
        root=tmp_path,
        split_sha256="0" * 64,
        records={"train": [], "val": [], "test": []},
        labels={"train": train_labels, "val": val_labels, "test": torch.zeros(0, dtype=torch.long)},
        greys={"train": _greys(train_images), "val": _greys(val_images), "test": []},
    )


def test_probe_then_fine_tune_starts_from_the_probe(tmp_path):
    cfg = TrainConfig(head_fit="probe_sgd", epochs=1, batch_size=8, lr=1e-4, keep="last", freeze_batchnorm=True)
    ensemble, busi = replace(TINY_ENSEMBLE, frozen_blocks=2), _tiny_busi(tmp_path)
    meta = load_checkpoint(train_teacher(ensemble, UNIT, cfg, busi, tmp_path / "lpft"))[1]
    assert [row["epoch"] for row in meta.history] == [0, 1] and meta.best_epoch == 1
    assert "train_loss" in meta.history[1] and "train_loss" not in meta.history[0]
    probe_only = load_checkpoint(train_teacher(ensemble, UNIT, replace(cfg, head_fit="probe"), busi, tmp_path / "lp"))
    assert meta.history[0] == probe_only[1].history[0]  # the fine-tune started from exactly that probe


def test_probe_needs_an_ensemble_and_head_fit_is_checked(tmp_path):
    busi = _tiny_busi(tmp_path, 6, 6)
    with pytest.raises(ValueError, match="needs an ensemble teacher"):
        train_teacher(TINY_TEACHER, UNIT, TrainConfig(head_fit="probe"), busi, tmp_path / "t")
    with pytest.raises(ValueError, match="head_fit must be one of"):
        train_teacher(TINY_ENSEMBLE, UNIT, TrainConfig(head_fit="adam"), busi, tmp_path / "t")
