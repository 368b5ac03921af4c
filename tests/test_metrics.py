"""Evaluation metrics agree with scikit-learn, intervals and calibration behave."""

from __future__ import annotations

import numpy as np
import pytest
import sklearn.metrics as skm
import torch

from kdcore import metrics
from kdcore.config import CLASS_NAMES
from kdcore.metrics import (
    calibrated_model_ece,
    evaluate_predictions,
    expected_calibration_error,
    fit_temperature,
    markdown_table,
)

# Hand example: 0 = benign, 1 = malignant, 2 = normal.
Y_TRUE = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
PROBS = np.array(
    [
        [0.7, 0.2, 0.1],  # benign    -> benign
        [0.6, 0.3, 0.1],  # benign    -> benign
        [0.3, 0.6, 0.1],  # benign    -> malignant
        [0.5, 0.1, 0.4],  # benign    -> benign
        [0.2, 0.7, 0.1],  # malignant -> malignant
        [0.6, 0.3, 0.1],  # malignant -> benign
        [0.1, 0.8, 0.1],  # malignant -> malignant
        [0.1, 0.1, 0.8],  # normal    -> normal
        [0.2, 0.1, 0.7],  # normal    -> normal
        [0.4, 0.1, 0.5],  # normal    -> normal
    ]
)


# The headline keys of every evaluation report (also checked on train.py's output in test_cli).
EVAL_KEYS = {
    "n",
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "per_class",
    "confusion_matrix",
    "auc_malignant_vs_benign",
    "ci95",
}
KEYS = EVAL_KEYS | {"ece"}


@pytest.fixture(scope="module")
def hand_result() -> dict:
    return evaluate_predictions(Y_TRUE, PROBS)


def test_evaluation_has_the_documented_keys(hand_result):
    assert KEYS <= set(hand_result)
    assert set(hand_result["per_class"]) == set(CLASS_NAMES)
    for row in hand_result["per_class"].values():
        assert set(row) == {"precision", "recall", "f1", "support"}
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "auc_malignant_vs_benign"):
        assert key in hand_result["ci95"]


def test_hand_example_matches_hand_counts_and_sklearn(hand_result):
    y_pred = PROBS.argmax(1)
    # By hand: 8 of 10 right; recalls 3/4, 2/3, 3/3.
    assert hand_result["n"] == 10
    assert hand_result["accuracy"] == pytest.approx(0.8)
    assert hand_result["balanced_accuracy"] == pytest.approx((3 / 4 + 2 / 3 + 1) / 3)
    assert hand_result["confusion_matrix"] == [[3, 1, 0], [1, 2, 0], [0, 0, 3]]
    # And the same as scikit-learn.
    assert hand_result["accuracy"] == pytest.approx(skm.accuracy_score(Y_TRUE, y_pred))
    assert hand_result["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(Y_TRUE, y_pred))
    assert hand_result["macro_f1"] == pytest.approx(skm.f1_score(Y_TRUE, y_pred, average="macro"))
    assert hand_result["confusion_matrix"] == skm.confusion_matrix(Y_TRUE, y_pred).tolist()
    precision, recall, f1, support = skm.precision_recall_fscore_support(Y_TRUE, y_pred)
    for i, name in enumerate(CLASS_NAMES):
        row = hand_result["per_class"][name]
        assert row["precision"] == pytest.approx(precision[i])
        assert row["recall"] == pytest.approx(recall[i])
        assert row["f1"] == pytest.approx(f1[i])
        assert row["support"] == support[i]
    assert hand_result["per_class"]["malignant"]["precision"] == pytest.approx(2 / 3)


def test_auc_is_malignant_vs_benign_on_those_images_only(hand_result):
    keep = Y_TRUE < 2
    scores = PROBS[keep, 1] / (PROBS[keep, 0] + PROBS[keep, 1])
    expected = skm.roc_auc_score(Y_TRUE[keep] == 1, scores)
    assert hand_result["auc_malignant_vs_benign"] == pytest.approx(expected)
    # By hand: malignant scores 7/9, 1/3, 8/9 vs benign 2/9, 1/3, 2/3, 1/6 -> 10.5 of 12 pairs.
    assert hand_result["auc_malignant_vs_benign"] == pytest.approx(10.5 / 12)


def test_bootstrap_intervals_contain_the_point_estimates():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 80)
    logits = rng.normal(size=(80, 3)) + 2.0 * np.eye(3)[y]  # a decent but imperfect classifier
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    result = evaluate_predictions(y, probs)
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "auc_malignant_vs_benign"):
        lo, hi = result["ci95"][key]
        assert lo <= result[key] <= hi, key
        assert hi - lo > 0.01, f"{key}: a bootstrap over 80 images cannot be that certain"
        assert 0.0 <= lo and hi <= 1.0


@pytest.mark.parametrize("classes", [(0, 1, 2), (0, 1), (0, 2), (1, 2)])
def test_fast_bootstrap_headline_equals_the_sklearn_headline(classes):
    """The bootstrap's numpy shortcut must give the same numbers as the sklearn point estimates."""
    rng = np.random.default_rng(len(classes) * 10 + classes[-1])
    for trial in range(25):
        n = int(rng.integers(4, 40))
        y = rng.choice(classes, n)
        probs = rng.dirichlet([1.0, 1.0, 1.0], n)
        if trial % 2:
            probs = np.round(probs, 1)  # ties in the AUC scores and in argmax
        fast, reference = metrics.fast_headline(y, probs), metrics._headline(y, probs)
        assert set(fast) == set(reference)
        for key, value in reference.items():
            if value is None:
                assert fast[key] is None, key
            else:
                assert fast[key] == pytest.approx(value, abs=1e-12), (key, trial)


def test_folder_with_only_benign_and_malignant_is_scored():
    y = np.array([0, 0, 0, 1, 1])
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.1, 0.7], [0.6, 0.3, 0.1], [0.3, 0.6, 0.1], [0.6, 0.3, 0.1]])
    result = evaluate_predictions(y, probs)
    assert result["n"] == 5
    assert result["per_class"]["normal"]["support"] == 0
    assert result["per_class"]["benign"]["support"] == 3
    assert result["accuracy"] == pytest.approx(3 / 5)
    # Balanced accuracy is the mean recall of the classes that are present: (2/3 + 1/2) / 2.
    assert result["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert result["auc_malignant_vs_benign"] is not None
    assert "normal" in markdown_table(result, "subset")


def test_auc_is_none_without_both_benign_and_malignant():
    y = np.array([0, 0, 2, 2])
    probs = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.2, 0.1, 0.7]])
    result = evaluate_predictions(y, probs)
    assert result["auc_malignant_vs_benign"] is None
    assert "n/a" in markdown_table(result, "no malignant")


def test_ece_is_zero_when_confidence_equals_accuracy():
    # 10 images at confidence 0.8 with 8 right, 5 at confidence 0.6 with 3 right.
    probs = np.array([[0.8, 0.1, 0.1]] * 10 + [[0.6, 0.3, 0.1]] * 5)
    y = np.array([0] * 8 + [1] * 2 + [0] * 3 + [2] * 2)
    assert expected_calibration_error(y, probs) == pytest.approx(0.0, abs=1e-12)
    # Overconfident: confidence 0.9, half right -> ECE 0.4.
    over = np.array([[0.9, 0.05, 0.05]] * 10)
    assert expected_calibration_error(np.array([0] * 5 + [1] * 5), over) == pytest.approx(0.4)


def test_calibrated_model_ece_is_the_binomial_noise_of_a_perfect_model():
    # Every image at confidence 0.7: the ECE is |accuracy - 0.7|, accuracy ~ Binomial(n, 0.7) / n,
    # whose mean absolute deviation is sqrt(0.21 / n) * sqrt(2 / pi).
    probs = np.tile([0.7, 0.2, 0.1], (40, 1))
    floor = calibrated_model_ece(probs, n=100, draws=3000)
    assert floor["mean"] == pytest.approx(np.sqrt(0.21 / 100) * np.sqrt(2 / np.pi), rel=0.1)
    assert floor["low"] < floor["mean"] < floor["high"]
    assert calibrated_model_ece(probs, n=2000)["mean"] < floor["mean"] / 3
    # A model sure of every answer draws exactly its own answers: no noise at all.
    certain = np.eye(3)[[0, 1, 2, 1]]
    assert calibrated_model_ece(certain, n=50) == {"n": 50, "mean": 0.0, "low": 0.0, "high": 0.0}


def test_fit_temperature_recovers_a_known_temperature():
    torch.manual_seed(0)
    true_logits = torch.randn(5000, 3) * 2.0
    targets = torch.multinomial(torch.softmax(true_logits, 1), 1).squeeze(1)
    for temperature in (0.5, 2.5):
        fitted = fit_temperature(true_logits * temperature, targets)
        assert fitted == pytest.approx(temperature, rel=0.1)
