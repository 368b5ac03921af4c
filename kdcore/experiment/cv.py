"""Group-aware k-fold cross-validation on train+val: how every recipe decision is made.

Each fold trains the recipe on the other folds for its fixed schedule (``keep=last``: nothing
is selected on the held-out fold) and scores the held-out fold once. The folds come from
``StratifiedGroupKFold`` over the near-duplicate groups, so no group is on both sides; the test
split is never read. Results go to ``reports/cv/NAME.json`` (per-fold scores, the Grad-CAM
pointing game on the fold's lesion images, mean ± std and the out-of-fold probabilities); folds
already scored are skipped, so a run resumes, and a rerun adds the pointing game to folds scored
before it was measured while their models are still on disk.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcore.checkpoint import checkpoint_paths
from kdcore.config import CLASS_NAMES, ModelConfig, PreprocessConfig, Recipe, TrainConfig
from kdcore.data import cross_validation_folds, label_indices
from kdcore.experiment.localisation import pointing_game
from kdcore.experiment.protocol import BusiData, train_student, train_teacher
from kdcore.inference import Predictor, load_predictor
from kdcore.metrics import calibrated_model_ece, evaluate_predictions, expected_calibration_error, fit_temperature
from kdcore.operating_point import POSITIVE_CLASS, TARGET_SENSITIVITY, choose_operating_point
from kdcore.runtime import CPU, Runtime, barrier

HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "malignant_recall", "auc_malignant_vs_benign")
POINTING_GAME = "pointing_game"  # per fold since 2026-12-04; older folds may lack it
ROLES = ("teacher", "student", "scratch")
SPECIFICITY_AT_TARGET = f"specificity_at_sensitivity_{TARGET_SENSITIVITY:.2f}"
CV_README = """# Cross-validation results

5-fold group-aware stratified cross-validation on train+val (603 images; near-duplicate groups
never straddle folds; the test split is not read). Each row: `python train.py cv --name NAME ...`
with the recipe stored in `NAME.json`; mean ± std over folds, uncalibrated out-of-fold scores,
the fold models trained for their fixed schedule (nothing selected on the held-out fold).
"OOF specificity at sensitivity 0.90": of the pooled out-of-fold malignant probabilities, the
share of non-malignant images below the highest threshold that still catches 90 % of the
malignant ones (how much a recipe's verdict rule would cost). "Pointing game": the share of the
held-out lesion images whose Grad-CAM peak lies inside the lesion mask (folds scored before it was
measured, whose models are gone, are left out: the count says how many). Wall seconds on the
2-core CPU machine.

"""


def fold_data(data: BusiData, fold: int, k: int, seed: int = 0) -> BusiData:
    """Fold ``fold`` of train+val as a ``BusiData``: the other folds are "train", this one "val"."""
    pool = data.records["train"] + data.records["val"]
    greys = dict(zip((r.file for r in pool), data.greys["train"] + data.greys["val"]))
    train_records, held_out = cross_validation_folds(pool, k=k, seed=seed)[fold]
    records = {"train": train_records, "val": held_out, "test": []}
    return BusiData(
        root=data.root,
        split_sha256=data.split_sha256,
        records=records,
        labels={s: label_indices(rs) for s, rs in records.items()},
        greys={s: [greys[r.file] for r in rs] for s, rs in records.items()},
    )


def train_fold(
    role: str,
    recipe: Recipe,
    data: BusiData,
    out_path: Path,
    teacher_path: Path | None,
    resume: bool,
    runtime: Runtime = CPU,
) -> Path:
    """One fold's model: a teacher (fresh augmentation) or a student (view bank, KD or scratch).
    Teacher outputs on a student's views are cached beside the fold's teacher, so every student
    recipe with the same views reuses them."""
    train_cfg = replace(recipe.train, keep="last")
    if role == "teacher":
        return train_teacher(recipe.model, recipe.preprocess, train_cfg, data, out_path, resume, runtime)
    cache = teacher_path.parent / "work" if teacher_path is not None else None
    return train_student(
        recipe.model, recipe.preprocess, train_cfg, data, out_path, teacher_path, resume, cache, runtime
    )


def fold_result(checkpoint: Path, data: BusiData) -> dict[str, Any]:
    """Scores of a fold's model on its held-out fold (uncalibrated probabilities)."""
    predictor = load_predictor(checkpoint)
    probs = torch.softmax(predictor.logits_for(data.greys["val"]), dim=1).numpy()
    y_true = data.labels["val"].numpy()
    scores = evaluate_predictions(y_true, probs)
    return {
        **{key: scores[key] for key in ("n", *HEADLINE)},
        **localisation(predictor, data),
        "files": [r.file for r in data.records["val"]],
        "labels": [r.label for r in data.records["val"]],
        "probabilities": np.round(probs, 5).tolist(),
    }


def localisation(predictor: Predictor, data: BusiData) -> dict[str, Any]:
    """The pointing game on the held-out fold's lesion images and how many there were."""
    game = pointing_game(predictor, data, split="val")
    return {POINTING_GAME: game["pointing_game"], "pointing_game_n": game["n"]}


def summarise(folds: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over folds of each headline score (folds where it is undefined are skipped)."""
    summary = {key: _mean_std([f[key] for f in folds if f[key] is not None]) for key in HEADLINE}
    games = [f[POINTING_GAME] for f in folds if f.get(POINTING_GAME) is not None]
    if games:  # folds scored before it was measured lack it: say over how many folds
        summary[POINTING_GAME] = {**_mean_std(games), "folds": len(games)}
    return summary


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


def pooled_predictions(folds: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) of all out-of-fold predictions."""
    y_true = np.array([CLASS_NAMES.index(label) for fold in folds for label in fold["labels"]])
    return y_true, np.array([p for fold in folds for p in fold["probabilities"]])


def pooled_scores(folds: list[dict[str, Any]]) -> dict[str, Any]:
    """Scores of all out-of-fold predictions pooled together, and the specificity a recipe
    buys at the operating point's target sensitivity (threshold set on these predictions: a
    description of the recipe's ROC, not a threshold to ship)."""
    y_true, probs = pooled_predictions(folds)
    scores = evaluate_predictions(y_true, probs)
    positive = CLASS_NAMES.index(POSITIVE_CLASS)
    point = choose_operating_point(probs[:, positive], y_true == positive, "out-of-fold predictions")
    return {key: scores[key] for key in ("n", *HEADLINE)} | {SPECIFICITY_AT_TARGET: point.specificity}


def pooled_calibration(folds: list[dict[str, Any]], test_size: int) -> dict[str, Any] | None:
    """Out-of-fold ECE as trained and after temperature scaling (each fold's temperature fitted
    on the other folds), and the chance ECE of a perfectly calibrated model on as many images
    and on ``test_size`` images. ``None`` with fewer than two folds."""
    if len(folds) < 2:
        return None
    scaled, temperatures = [], []
    for held_out in folds:
        others = [fold for fold in folds if fold is not held_out]
        y_fit, p_fit = pooled_predictions(others)
        temperature = fit_temperature(_log(p_fit), torch.from_numpy(y_fit))
        temperatures.append(temperature)
        scaled.append(torch.softmax(_log(np.array(held_out["probabilities"])) / temperature, 1).numpy())
    y_true, probs = pooled_predictions(folds)
    scaled_probs = np.concatenate(scaled)
    return {
        "ece": expected_calibration_error(y_true, probs),
        "ece_after_temperature": expected_calibration_error(y_true, scaled_probs),
        "temperatures": temperatures,
        "calibrated_model_ece": calibrated_model_ece(scaled_probs, len(y_true)),
        "calibrated_model_ece_at_test_size": calibrated_model_ece(scaled_probs, test_size),
    }


def _log(probs: np.ndarray) -> torch.Tensor:
    """Log-probabilities: logits up to a per-image constant, which a temperature leaves alone."""
    return torch.from_numpy(np.log(np.clip(probs, 1e-7, 1.0))).float()


def run_cv(
    name: str,
    role: str,
    recipe: Recipe,
    data: BusiData,
    runs_dir: Path,
    results_dir: Path,
    k: int = 5,
    folds: tuple[int, ...] | None = None,
    teacher_cv: str | None = None,
    runtime: Runtime = CPU,
) -> dict[str, Any]:
    """Cross-validate one recipe; returns (and writes) ``results_dir/NAME.json``. Under torchrun
    every rank trains each fold together; rank 0 scores it and writes the results."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if role == "student" and not teacher_cv:
        raise ValueError("a KD student needs --teacher-cv NAME: the CV run whose fold teachers it learns from")
    results_dir.mkdir(parents=True, exist_ok=True)
    out_json = results_dir / f"{name}.json"
    done = completed_folds(out_json)
    if done:
        _check_same_recipe(out_json, role, recipe, k, teacher_cv)
        if runtime.is_main and (added := _add_missing_localisation(done, runs_dir / name, data, k)):
            _write(out_json, name, role, recipe, k, teacher_cv, [done[f] for f in sorted(done)])
            print(f"[cv {name}] pointing game added for folds {added}", flush=True)
    todo = [fold for fold in (folds if folds is not None else range(k)) if fold not in done]
    if role == "student":
        _check_fold_teachers(runs_dir / teacher_cv, todo)
    for fold in todo:
        data_k = fold_data(data, fold, k)
        teacher = runs_dir / teacher_cv / f"fold{fold}" if role == "student" else None
        started = time.time()
        checkpoint = train_fold(role, recipe, data_k, runs_dir / name / f"fold{fold}", teacher, True, runtime)
        if not runtime.is_main:
            continue
        result = {"fold": fold, "seconds": round(time.time() - started, 1), **fold_result(checkpoint, data_k)}
        print(f"[cv {name}] fold {fold}: accuracy {result['accuracy']:.3f}", flush=True)
        # Folds may run in parallel processes (--folds): merge with what they wrote meanwhile.
        done = {**completed_folds(out_json), fold: result}
        _write(out_json, name, role, recipe, k, teacher_cv, [done[f] for f in sorted(done)])
    barrier(runtime)  # rank 0 has written the results
    return json.loads(out_json.read_text())


def _add_missing_localisation(folds: dict[int, dict[str, Any]], runs: Path, data: BusiData, k: int) -> list[int]:
    """Score, in place, the pointing game of folds scored before it was measured, where the
    fold's model is still on disk and was scored on the same held-out images; returns them."""
    added = []
    for number, fold in folds.items():
        checkpoint = runs / f"fold{number}"
        if POINTING_GAME in fold or not checkpoint_paths(checkpoint)[0].is_file():
            continue
        data_k = fold_data(data, number, k)
        if fold["files"] == [r.file for r in data_k.records["val"]]:
            fold.update(localisation(load_predictor(checkpoint), data_k))
            added.append(number)
    return added


def _check_fold_teachers(teacher_runs: Path, folds: list[int]) -> None:
    """Fail before any work when a fold teacher is missing (its CV results may be committed
    while its models, being intermediate runs, are not)."""
    missing = [f for f in folds if not checkpoint_paths(teacher_runs / f"fold{f}")[0].is_file()]
    if missing:
        raise FileNotFoundError(
            f"no fold teacher for folds {missing} in {teacher_runs}: train them with "
            f"`train.py cv --name {teacher_runs.name} --role teacher ...` (its recipe is in "
            f"reports/cv/{teacher_runs.name}.json; pass --reports to another folder if its results exist)"
        )


def _check_same_recipe(out_json: Path, role: str, recipe: Recipe, k: int, teacher_cv: str | None) -> None:
    """Refuse to add folds of another recipe to a result file (its mean would mix two recipes)."""
    previous = json.loads(out_json.read_text())
    changed = [key for key, value in {"role": role, "k": k, "teacher_cv": teacher_cv}.items() if previous[key] != value]
    changed += recipe_changes(previous["recipe"], recipe)
    if changed:
        raise ValueError(
            f"{out_json} holds folds of another recipe ({', '.join(changed)} differ): give this "
            "recipe a new --name, or the --set values of the folds already there"
        )


def recipe_changes(recorded: dict[str, Any], recipe: Recipe) -> list[str]:
    """The settings (as `section.key`) in which `recipe` differs from one recorded in a result
    file; a setting added after the file was written counts at its default."""
    now = _as_json(recipe)
    blank = Recipe(ModelConfig(recipe.model.kind, recipe.model.cnn_name), PreprocessConfig(), TrainConfig())
    defaults = _as_json(blank)
    return [
        f"{section}.{key}" for section, values in now.items() for key, value in values.items()
        if recorded.get(section, {}).get(key, defaults[section][key]) != value
    ]  # fmt: skip


def _as_json(recipe: Recipe) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(recipe)))


def completed_folds(out_json: Path) -> dict[int, dict[str, Any]]:
    """The folds already in a CV result file, by fold number."""
    previous = json.loads(out_json.read_text()) if out_json.is_file() else {}
    return {f["fold"]: f for f in previous.get("folds", [])}


def _write(
    path: Path, name: str, role: str, recipe: Recipe, k: int, teacher_cv: str | None, folds: list[dict[str, Any]]
) -> None:
    result = {
        "name": name,
        "role": role,
        "k": k,
        "teacher_cv": teacher_cv,
        "recipe": asdict(recipe),
        "cpu_seconds_wall": round(sum(f["seconds"] for f in folds), 1),
        "mean_std": summarise(folds),
        "pooled": pooled_scores(folds),
        "folds": folds,
    }
    path.write_text(json.dumps(result, indent=1))


def cv_table(results_dir: Path, test_size: int) -> str:
    """Markdown table of every CV result in ``results_dir``: mean ± std over folds, then the
    calibration of the pooled out-of-fold predictions and the accuracy fold by fold."""
    rows = [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))]
    lines = [
        "| recipe | role | folds | " + " | ".join(HEADLINE)
        + " | OOF specificity at sensitivity 0.90 | pointing game (folds) | wall s |",
        "|---|---|---|" + "---|" * len(HEADLINE) + "---|---|---|",
    ]  # fmt: skip
    for r in rows:
        cells = [f"{r['mean_std'][k]['mean']:.3f} ± {r['mean_std'][k]['std']:.3f}" for k in HEADLINE]
        specificity = pooled_scores(r["folds"])[SPECIFICITY_AT_TARGET]
        game = r["mean_std"].get(POINTING_GAME)
        game_cell = f"{game['mean']:.3f} ± {game['std']:.3f} ({game['folds']})" if game else "n/a"
        lines.append(
            f"| {r['name']} | {r['role']} | {len(r['folds'])}/{r['k']} | "
            + " | ".join(cells)
            + f" | {specificity:.3f} | {game_cell} | {r['cpu_seconds_wall']:.0f} |"
        )
    return "\n".join(lines) + "\n\n" + calibration_table(rows, test_size) + "\n" + fold_table(rows)


def calibration_table(rows: list[dict[str, Any]], test_size: int) -> str:
    """Top-label ECE (10 bins) of each recipe's pooled out-of-fold predictions, and the ECE a
    perfectly calibrated model would show by chance on as many images and on the test split."""
    lines = [
        "Calibration of the pooled out-of-fold predictions (top-label ECE, 10 bins; the temperature of"
        " each fold fitted on the other folds). A perfectly calibrated model with the scaled"
        " probabilities, its labels drawn from them, would still show the ECE in the last two columns"
        f" by chance (mean [95 % range]): on the test split's {test_size} images a test ECE in that"
        " range is no evidence of miscalibration. Recipes run on one fold only are left out (no other"
        " fold to fit a temperature on).",
        "",
        "| recipe | role | OOF ECE | temperatures | after temperature | perfectly calibrated, OOF size"
        f" | perfectly calibrated, {test_size} images |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        if (calibration := pooled_calibration(r["folds"], test_size)) is None:
            continue
        floors = [calibration[k] for k in ("calibrated_model_ece", "calibrated_model_ece_at_test_size")]
        lines.append(
            f"| {r['name']} | {r['role']} | {calibration['ece']:.3f} | "
            f"{min(calibration['temperatures']):.2f}–{max(calibration['temperatures']):.2f} | "
            f"{calibration['ece_after_temperature']:.3f} | "
            f"{_mean_range(floors[0])} (n {floors[0]['n']}) | {_mean_range(floors[1])} |"
        )
    return "\n".join(lines) + "\n"


def _mean_range(ece: dict[str, float | int]) -> str:
    """``mean [low, high]`` of a chance-ECE summary."""
    return f"{ece['mean']:.3f} [{ece['low']:.3f}, {ece['high']:.3f}]"


def fold_table(rows: list[dict[str, Any]]) -> str:
    """Accuracy of each recipe fold by fold: every recipe sees the same folds, so two recipes
    are compared on the folds both have (paired), not by means over different folds."""
    k = max(r["k"] for r in rows)
    lines = [
        "Accuracy fold by fold (the same held-out images for every recipe):",
        "",
        "| recipe | role | " + " | ".join(f"fold {f}" for f in range(k)) + " |",
        "|---|---|" + "---|" * k,
    ]
    for r in rows:
        by_fold = {f["fold"]: f"{f['accuracy']:.3f}" for f in r["folds"]}
        lines.append(f"| {r['name']} | {r['role']} | " + " | ".join(by_fold.get(f, "") for f in range(k)) + " |")
    return "\n".join(lines) + "\n"
