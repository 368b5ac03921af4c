"""The CV calibration table: out-of-fold ECE before and after a cross-fitted temperature, and
the ECE a perfectly calibrated model would show by chance."""

from __future__ import annotations

import pytest
import torch

from kdcore.config import CLASS_NAMES
from kdcore.experiment.cv import calibration_table, pooled_calibration


def overconfident_folds(sharpen: tuple[float, ...] = (3.0, 3.0, 3.0), per_fold: int = 400) -> list[dict]:
    """One fold per ``sharpen`` factor, its probabilities a calibrated model's logits times the
    factor: labels are drawn from the calibrated probabilities, so that temperature undoes it."""
    generator = torch.Generator().manual_seed(0)
    folds = []
    for fold, factor in enumerate(sharpen):
        logits = torch.randn(per_fold, 3, generator=generator) * 1.5
        labels = torch.multinomial(torch.softmax(logits, 1), 1, generator=generator).squeeze(1)
        folds.append(
            {
                "fold": fold,
                "labels": [CLASS_NAMES[i] for i in labels],
                "probabilities": torch.softmax(logits * factor, 1).tolist(),
            }
        )
    return folds


def test_cross_fitted_temperature_repairs_an_overconfident_recipe():
    calibration = pooled_calibration(overconfident_folds(), test_size=150)
    assert calibration["ece"] > 0.15  # sharpened threefold: far too sure
    assert calibration["temperatures"] == pytest.approx([3.0] * 3, rel=0.15)
    floor = calibration["calibrated_model_ece"]
    assert floor["n"] == 1200 and calibration["ece_after_temperature"] <= floor["high"]
    at_test = calibration["calibrated_model_ece_at_test_size"]
    assert at_test["n"] == 150 and at_test["mean"] > floor["mean"]  # fewer images, more chance ECE


def test_no_fold_is_scaled_by_a_temperature_fitted_on_itself():
    # Fold 0 is calibrated, folds 1-2 sharpened threefold: fold 0's temperature comes from
    # folds 1-2 alone (about 3); had fold 0 been in its own fit, it would be pulled towards 1.
    temperatures = pooled_calibration(overconfident_folds((1.0, 3.0, 3.0)), test_size=150)["temperatures"]
    assert temperatures[0] == pytest.approx(3.0, rel=0.1)
    assert temperatures[1] < 0.85 * temperatures[0] and temperatures[2] < 0.85 * temperatures[0]


def test_one_fold_has_no_held_out_temperature():
    assert pooled_calibration(overconfident_folds((3.0,)), test_size=150) is None


def test_calibration_table_lists_recipes_with_two_folds_or_more():
    rows = [
        {"name": "sharp", "role": "student", "folds": overconfident_folds()},
        {"name": "single", "role": "teacher", "folds": overconfident_folds((3.0,))},
    ]
    table = calibration_table(rows, test_size=151)
    assert "perfectly calibrated, 151 images" in table and "| single |" not in table
    (row,) = [line for line in table.splitlines() if line.startswith("| sharp |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    expected = pooled_calibration(rows[0]["folds"], 151)
    assert float(cells[2]) == pytest.approx(expected["ece"], abs=5e-4)
    low, high = (float(t) for t in cells[3].split("–"))
    assert low == pytest.approx(min(expected["temperatures"]), abs=5e-3)
    assert float(cells[4]) == pytest.approx(expected["ece_after_temperature"], abs=5e-4)
    assert cells[5].endswith("(n 1200)")
    at_test = expected["calibrated_model_ece_at_test_size"]
    assert cells[6] == f"{at_test['mean']:.3f} [{at_test['low']:.3f}, {at_test['high']:.3f}]"
    assert high == pytest.approx(max(expected["temperatures"]), abs=5e-3)
