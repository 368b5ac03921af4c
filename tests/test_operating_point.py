"""The verdict's malignant threshold: chosen for sensitivity >= 0.90, applied the same way by
every path (predictor, live smoothing, metrics), stored in the checkpoint and shown to people."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from kdcore.checkpoint import CheckpointMeta
from kdcore.config import CLASS_NAMES
from kdcore.metrics import at_operating_point
from kdcore.operating_point import (
    ARGMAX_RULE,
    OperatingPoint,
    choose_operating_point,
    decide,
    sensitivity_specificity,
)

# ten malignant cases scored 1.0, 0.9 ... 0.1; six others
P_MALIGNANT = np.array([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.15, 0.25, 0.35, 0.45, 0.95])
IS_MALIGNANT = np.array([True] * 10 + [False] * 6)


def test_threshold_is_the_highest_that_reaches_the_target_sensitivity():
    point = choose_operating_point(P_MALIGNANT, IS_MALIGNANT, "validation split")
    assert point.threshold == pytest.approx(0.2)  # catches 9 of 10; 0.2 + eps would catch 8
    assert point.sensitivity == pytest.approx(0.9)
    assert point.specificity == pytest.approx(2 / 6)  # 0.25, 0.35, 0.45 and 0.95 are called malignant
    assert (point.positives, point.negatives, point.source) == (10, 6, "validation split")
    assert choose_operating_point(P_MALIGNANT, IS_MALIGNANT, "v", target=1.0).threshold == pytest.approx(0.1)
    assert choose_operating_point(P_MALIGNANT, IS_MALIGNANT, "v", target=0.5).threshold == pytest.approx(0.6)


def test_no_malignant_case_is_refused():
    with pytest.raises(ValueError, match="malignant"):
        choose_operating_point(np.array([0.1, 0.2]), np.array([False, False]), "validation split")


def test_sensitivity_specificity_by_hand():
    assert sensitivity_specificity(P_MALIGNANT, IS_MALIGNANT, 0.5) == (0.6, 5 / 6)


def test_decide_applies_the_threshold_and_otherwise_the_most_probable_other_class():
    point = OperatingPoint(0.25, 0.9, 0.9, 0.5, 10, 10, "validation split")
    probs = np.array(
        [
            [0.50, 0.30, 0.20],  # malignant >= 0.25 although benign is higher
            [0.70, 0.20, 0.10],  # below: benign
            [0.10, 0.20, 0.70],  # below: normal
            [0.10, 0.80, 0.10],  # malignant
        ]
    )
    assert decide(probs, CLASS_NAMES, point).tolist() == [1, 0, 2, 1]
    assert decide(probs, CLASS_NAMES, None).tolist() == [0, 0, 2, 1]  # no point: argmax
    strict = replace(point, threshold=0.9)
    assert decide(probs, CLASS_NAMES, strict).tolist() == [0, 0, 2, 0]  # argmax malignant, below the rule
    assert int(decide(probs[0], CLASS_NAMES, point)) == 1  # one case works too


def test_scores_at_the_operating_point():
    point = OperatingPoint(0.25, 0.9, 0.9, 0.5, 10, 10, "validation split")
    y_true = np.array([1, 0, 0, 2])
    probs = np.array([[0.6, 0.3, 0.1], [0.5, 0.3, 0.2], [0.8, 0.1, 0.1], [0.1, 0.1, 0.8]])
    scores = at_operating_point(y_true, probs, point)
    assert scores["sensitivity"] == 1.0 and scores["specificity"] == pytest.approx(2 / 3)
    assert scores["accuracy"] == pytest.approx(3 / 4) and scores["chosen_on"] == "validation split"
    assert scores["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]


def test_the_point_round_trips_through_the_record_and_old_records_have_none(tiny_checkpoints):
    meta = CheckpointMeta.read(tiny_checkpoints["student"])
    assert meta.operating_point is None  # a record without one: argmax
    point = OperatingPoint(0.12, 0.9, 0.9, 0.57, 20, 56, "validation split")
    again = CheckpointMeta.from_json(replace(meta, operating_point=point).to_json())
    assert again.operating_point == point


def test_predictor_verdict_follows_the_stored_rule(tiny_checkpoints):
    from kdcore.inference import load_predictor

    predictor = load_predictor(tiny_checkpoints["student"])
    logits = torch.tensor([[2.0, 1.0, 0.0]])  # benign most probable, malignant 24 %
    plain = predictor.prediction_from_logits(logits, 1.0).as_dict()
    assert plain["label"] == "benign" and plain["verdict_rule"] == ARGMAX_RULE
    predictor.meta = replace(predictor.meta, operating_point=OperatingPoint(0.2, 0.9, 0.9, 0.5, 1, 1, "v"))
    ruled = predictor.prediction_from_logits(logits, 1.0).as_dict()  # what /predict returns, rule included
    assert ruled["label"] == "malignant" and ruled["verdict_rule"].startswith("malignant when p(malignant) ≥ 20%")


def test_the_rule_is_shown_next_to_the_verdict():
    from kdcore.app.service import prediction_markdown
    from kdcore.inference import Prediction

    prediction = Prediction("malignant", {"benign": 0.6, "malignant": 0.3, "normal": 0.1}, 3.0)
    point = OperatingPoint(0.12, 0.9, 0.9, 0.571, 20, 56, "validation split")
    line = prediction_markdown("student", prediction, point=point)
    assert "malignant when p(malignant) ≥ 12%: sensitivity 90%, specificity 57%" in line
    assert "validation split (20 malignant, 56 other)" in line
    assert "most probable class" in prediction_markdown("student", prediction)
