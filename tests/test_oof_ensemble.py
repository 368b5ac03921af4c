"""Out-of-fold ensembles: averaged held-out probabilities of CV runs on the same folds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdcore.experiment import oof_ensemble

BENIGN, MALIGNANT = [0.9, 0.05, 0.05], [0.05, 0.9, 0.05]
UNSURE_BENIGN, UNSURE_MALIGNANT = [0.45, 0.4, 0.15], [0.4, 0.45, 0.15]


def _cv_result(folder: Path, name: str, folds: list[list[tuple[str, str, list[float]]]]) -> None:
    result = {
        "name": name,
        "folds": [
            {"fold": i, "files": [f for f, _, _ in rows], "labels": [lab for _, lab, _ in rows],
             "probabilities": [p for _, _, p in rows]}
            for i, rows in enumerate(folds)
        ],
    }  # fmt: skip
    (folder / f"{name}.json").write_text(json.dumps(result))


@pytest.fixture
def cv_dir(tmp_path: Path) -> Path:
    """Two runs, each right on 1 of 2 images per fold, confidently where right and unsure where
    wrong, so their average is right on both; and a run whose folds hold out other images."""
    labels = [("a.png", "benign"), ("b.png", "malignant")], [("c.png", "benign"), ("d.png", "malignant")]
    first = [[(a, la, BENIGN), (b, lb, UNSURE_BENIGN)] for (a, la), (b, lb) in labels]
    second = [[(a, la, UNSURE_MALIGNANT), (b, lb, MALIGNANT)] for (a, la), (b, lb) in labels]
    _cv_result(tmp_path, "first", first)
    _cv_result(tmp_path, "second", second)
    swapped = [[("a.png", "benign", BENIGN), ("d.png", "malignant", MALIGNANT)],
               [("c.png", "benign", BENIGN), ("b.png", "malignant", MALIGNANT)]]  # fmt: skip
    _cv_result(tmp_path, "other_folds", swapped)
    return tmp_path


def test_the_average_of_complementary_runs_is_scored_per_fold(cv_dir):
    results = {name: json.loads((cv_dir / f"{name}.json").read_text()) for name in ("first", "second")}
    assert [s["accuracy"] for s in oof_ensemble.ensemble_fold_scores({"first": results["first"]})] == [0.5, 0.5]
    assert [s["accuracy"] for s in oof_ensemble.ensemble_fold_scores(results)] == [1.0, 1.0]

    table = oof_ensemble.ensemble_table([["first", "second"]], "first", cv_dir)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()[2:]}
    assert set(rows) == {"first", "second", "first + second"}
    assert "| 1.000 ± 0.000 |" in rows["first + second"] and "| 0.500 ± 0.000 | 2/2 |" in rows["first + second"]
    assert "| 0.000 ± 0.000 | 0/2 |" in rows["second"]  # right as often as the baseline alone


def test_runs_on_other_folds_or_missing_runs_are_refused(cv_dir, capsys):
    assert oof_ensemble.main(["first+other_folds", "--baseline", "first", "--cv-dir", str(cv_dir)]) == 2
    assert "hold out different images in fold 0" in capsys.readouterr().err
    assert oof_ensemble.main(["first+absent", "--baseline", "first", "--cv-dir", str(cv_dir)]) == 2
    assert "no CV result for ['absent']" in capsys.readouterr().err


def test_the_command_writes_its_table_and_names_itself(cv_dir, tmp_path):
    out = tmp_path / "ensembles.md"
    assert oof_ensemble.main(["first+second", "--baseline", "first", "--cv-dir", str(cv_dir), "--out", str(out)]) == 0
    assert out.read_text().startswith("Out-of-fold ensembles: `python -m kdcore.experiment.oof_ensemble first+second")
