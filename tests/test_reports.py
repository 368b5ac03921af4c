"""The reference run's reports: the shipped recipe is the one cross-validation chose, and the
results carry its CV scores and the external (other hospital) check."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from test_cli import _external_folder_with_manifest

from kdcore.config import DEFAULT_SPLIT_FILE, OFFLINE, PAPER, REPO_ROOT, Recipe, scratch_recipe
from kdcore.experiment import model_card, reports
from kdcore.experiment.cv import recipe_changes
from kdcore.experiment.pipeline import cross_validation_results, external_results

CV_DIR = REPO_ROOT / "reports" / "cv"
# What does not change the model a row trains: CV always keeps the last epoch and runs seed 0;
# an ensemble has no global branch; a scratch student has no distillation terms.
IGNORED = {
    "teacher": {"train": {"keep", "seed", "epochs", "lr", "patience"}, "model": {"global_branch"}},
    "student": {"train": {"keep", "seed"}, "model": set()},
    "scratch": {"train": {"keep", "seed", "alpha", "kd_temperature"}, "model": set()},
}


def _preset_recipe(row: str) -> Recipe:
    if row == "teacher":
        return Recipe(OFFLINE.teacher, OFFLINE.teacher_preprocess, OFFLINE.teacher_train)
    train = scratch_recipe(OFFLINE) if row == "scratch" else OFFLINE.student_train
    return Recipe(OFFLINE.student, OFFLINE.student_preprocess, train)


@pytest.mark.parametrize("row", [row for row, _ in OFFLINE.cv_runs])
def test_offline_preset_is_the_recipe_cross_validation_chose(row):
    name = dict(OFFLINE.cv_runs)[row]
    chosen = json.loads((CV_DIR / f"{name}.json").read_text())
    assert chosen["role"] == {"teacher": "teacher", "student": "student", "scratch": "scratch"}[row]
    assert len(chosen["folds"]) >= 3
    ignored = {f"{group}.{key}" for group, keys in IGNORED[row].items() for key in keys}
    differing = sorted(set(recipe_changes(chosen["recipe"], _preset_recipe(row))) - ignored)
    assert not differing, f"{row}: {differing} differ from reports/cv/{name}.json"


def test_a_setting_added_after_a_result_file_counts_at_its_default():
    recorded = json.loads(json.dumps(asdict(_preset_recipe("student"))))
    del recorded["train"]["unlabeled_frames"]
    assert recipe_changes(recorded, _preset_recipe("student")) == []
    recorded["train"]["alpha"] = -1.0
    assert recipe_changes(recorded, _preset_recipe("student")) == ["train.alpha"]


def test_results_carry_cross_validation_and_the_external_check(tmp_path, tiny_checkpoints):
    cv_dir = tmp_path / "cv"
    cv_dir.mkdir()
    stats = {"mean": 0.8, "std": 0.05}
    scores = {"accuracy": stats, "auc_malignant_vs_benign": stats}
    fake_cv = {"name": "kd", "k": 5, "folds": [{}] * 3, "mean_std": scores}
    (cv_dir / "kd.json").write_text(json.dumps(fake_cv))
    preset = replace(OFFLINE, cv_runs=(("student", "kd"), ("scratch", "not_run")))
    assert cross_validation_results(preset, cv_dir) == {"student": fake_cv}
    assert reports.cv_cells({"folds": 3, "k": 5, **scores}) == "0.800 ± 0.050 (3/5 folds) | 0.800 ± 0.050"

    ship_dir = Path(tiny_checkpoints["student"]).parent  # teacher.* and student.*
    folder = _external_folder_with_manifest(tmp_path / "other_hospital")
    external = external_results(ship_dir, folder, DEFAULT_SPLIT_FILE, tmp_path / "reports")
    assert set(external) == {"teacher", "student"} and all(e["n"] == 4 for e in external.values())
    assert (tmp_path / "reports" / "external" / "other_hospital_student.json").is_file()
    assert external_results(ship_dir, tmp_path / "missing", DEFAULT_SPLIT_FILE, tmp_path / "reports") == {}

    section = reports.external_section(external)
    assert "`other_hospital` (another hospital, n=4; never trained or tuned on" in section
    assert section.count("\n| teacher |") == section.count("\n| student |") == 1
    auc = external["student"]["auc_malignant_vs_benign"]
    assert f"student {auc:.3f}" in model_card.external_words({"external": external})
    assert model_card.external_words({"external": {}}) == "no external validation."


def test_the_model_card_says_how_the_teacher_was_chosen():
    one = {"teacher_selection": {"teacher_ensemble": {}}}
    cv = {"teacher": {"run": "ens_probe", "k": 5}}
    assert model_card.teacher_choice_words({**one, "cross_validation": cv}) == (
        "Recipe chosen by 5-fold cross-validation on train+val (`reports/cv/ens_probe.json`)."
    )
    assert model_card.teacher_choice_words(one) == "The preset's only teacher (nothing compared)."
    two = {"teacher_selection": {"a": {}, "b": {}}, "cross_validation": cv}
    assert model_card.teacher_choice_words(two) == "Selected on validation among: a, b."


def test_the_protocol_ablation_arms_drop_the_masks_then_the_teacher():
    """Per seed: KD + mask guidance, KD on the logits alone (same views, teacher and epochs),
    and the student alone (no teacher, no masks); a recipe without extras has no logits arm."""
    from kdcore.experiment.runs import student_runs

    runs = student_runs(OFFLINE, (0, 1), None, include_extra=False)
    assert [r.name for r in runs] == [
        f"mobilenetv3_{arm}_s{seed}" for seed in (0, 1) for arm in ("kd", "kd_logits", "scratch")
    ]
    by_arm = {arm: [r for r in runs if r.row == f"mobilenetv3_{arm}"] for arm in ("kd", "kd_logits", "scratch")}
    assert [r.with_teacher for r in runs] == [True, True, False] * 2
    assert all(r.train.mask_weight == 1 for r in by_arm["kd"])
    assert all(r.train.mask_weight == 0 and r.train.attention_weight == 0 for r in by_arm["kd_logits"])
    for other in ("kd_logits", "scratch"):
        assert [replace(r.train, mask_weight=1) for r in by_arm[other]] == [r.train for r in by_arm["kd"]]
    paper = student_runs(PAPER, (0,), None, include_extra=False)
    assert [r.name for r in paper] == ["mobilenetv3_kd_s0", "mobilenetv3_scratch_s0"]
