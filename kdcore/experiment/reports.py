"""reports/ of the reference run: summary.json, paper-style tables, KD ablation,
Grad-CAM localisation, calibration and figures (the model card: ``model_card``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from kdcore.checkpoint import CheckpointMeta
from kdcore.config import CLASS_NAMES
from kdcore.data import label_indices
from kdcore.experiment.localisation import pointing_game
from kdcore.experiment.protocol import BusiData
from kdcore.experiment.runs import StudentRun
from kdcore.inference import Predictor, load_predictor
from kdcore.metrics import (
    evaluate_predictions,
    expected_calibration_error,
    markdown_table,
    plot_confusion_matrix,
    plot_reliability,
    plot_roc,
    plot_training_curves,
)
from kdcore.models import load_tensor_file

PAPER_TABLE1 = {  # class -> (teacher P, R, F1, student P, R, F1), from the paper
    "benign": (0.96, 0.89, 0.92, 0.96, 0.91, 0.93),
    "malignant": (0.92, 0.97, 0.94, 0.94, 0.97, 0.96),
    "normal": (0.97, 1.00, 0.98, 0.95, 0.98, 0.96),
}
PAPER_TABLE2 = [
    ("paper teacher (ViT-B/16 + ConvNeXt-T, GPU-trained)", 438.8, None, 242.9, 4.1),
    ("paper student (MobileNetV3)", 5.9, None, 16.3, 61.46),
]
PAPER_ACCURACY = {"teacher": 0.9506, "student": 0.9506, "scratch": 0.8846}
HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "malignant_recall", "auc_malignant_vs_benign")
ABLATION = (*HEADLINE, "pointing_game")  # the seed table also says where each arm's Grad-CAM looks


def test_predictions(predictor: Predictor, data: BusiData) -> tuple[np.ndarray, np.ndarray]:
    """Raw (uncalibrated) test logits and labels; images come from the cached split."""
    return predictor.logits_for(data.greys["test"]).numpy(), data.labels["test"].numpy()


def _softmax(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(logits), 1).numpy()


def calibrated(predictor: Predictor, logits: np.ndarray) -> np.ndarray:
    """The predictor's calibrated probabilities for raw logits."""
    return predictor.probabilities(torch.from_numpy(logits)).numpy()


def mean_std(values: list[float | None]) -> dict[str, float | int | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, "n": len(vals)}


def fp16_agreement(teacher_path: Path, data: BusiData, logits_fp16: np.ndarray) -> float | None:
    """Share of test predictions unchanged between the fp32 best state and the fp16 file."""
    state_file = teacher_path.parent / "work" / teacher_path.name / "last.pt"
    if not state_file.is_file():
        return None
    predictor = load_predictor(teacher_path)
    best_state = load_tensor_file(state_file)["best_state"]
    predictor.model.load_state_dict(best_state)
    logits_fp32, _ = test_predictions(predictor, data)
    return float(np.mean(logits_fp32.argmax(1) == logits_fp16.argmax(1)))


def _fmt(stats: dict[str, Any]) -> str:
    return "n/a" if stats["mean"] is None else f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def with_ci(result: dict[str, Any], key: str) -> str:
    value, ci = result.get(key), result["ci95"].get(key)
    if value is None:
        return "n/a"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{value:.3f}"


def table1(teacher: dict[str, Any], student: dict[str, Any]) -> str:
    lines = [
        "| class | model | precision | recall | F1 | paper P | paper R | paper F1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in CLASS_NAMES:
        for role, result, offset in (("teacher", teacher, 0), ("student", student, 3)):
            row, paper = result["per_class"][name], PAPER_TABLE1[name][offset : offset + 3]
            lines.append(
                f"| {name} | {role} | {row['precision']:.3f} | {row['recall']:.3f} | {row['f1']:.3f} | "
                + " | ".join(f"{v:.2f}" for v in paper)
                + " |"
            )
    lines.append(
        f"| all | teacher accuracy | {with_ci(teacher, 'accuracy')} | | | {PAPER_ACCURACY['teacher']:.4f} | | |"
    )
    lines.append(
        f"| all | student accuracy | {with_ci(student, 'accuracy')} | | | {PAPER_ACCURACY['student']:.4f} | | |"
    )
    return "\n".join(lines) + "\n"


def ablation_table(summary: dict[str, Any]) -> str:
    """Markdown: the teacher, then each student arm's mean ± std over its seeds, with where it looks."""
    teacher = {**summary["teacher"], "pointing_game": summary["localisation"]["teacher"]["pointing_game"]}
    lines = ["| model | seeds | " + " | ".join(ABLATION) + " |", "|---|---|" + "---|" * len(ABLATION)]
    lines.append("| teacher (selected on val) | 1 | " + " | ".join(with_ci(teacher, k) for k in ABLATION) + " |")
    for row, stats in summary["ablation_mean_std"].items():
        seeds = stats[ABLATION[0]]["n"]
        lines.append(f"| {row} | {seeds} | " + " | ".join(_fmt(stats[k]) for k in ABLATION) + " |")
    return "\n".join(lines) + "\n"


def build(
    data: BusiData,
    runs: Path,
    teachers: list[Path],
    budget: int,
    teacher: Path,
    student: Path,
    student_runs: list[StudentRun],
    reports_dir: Path,
    efficiency: dict[str, Any],
    context: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate everything on the test split once and write every report.

    ``efficiency`` is the benchmark's result for the shipped models (``reports/benchmark.md``
    is the efficiency table: one measurement, one unit); ``context``: ``cross_validation``
    (row -> the CV result of its recipe) and ``external`` (role -> scores on another hospital).
    """
    context = context or {}
    reports_dir.mkdir(parents=True, exist_ok=True)
    y_true = label_indices(data.records["test"]).numpy()
    predictors = {"teacher": load_predictor(teacher), "student": load_predictor(student)}
    logits = {k: test_predictions(p, data)[0] for k, p in predictors.items()}
    evaluations: dict[str, dict[str, Any]] = {}
    for run in tqdm(student_runs, desc="evaluating students", leave=False):
        predictor = load_predictor(runs / run.name)
        run_logits, _ = test_predictions(predictor, data)
        evaluations[run.name] = {
            **evaluate_predictions(y_true, calibrated(predictor, run_logits)),
            "pointing_game": pointing_game(predictor, data)["pointing_game"],
        }
    summary: dict[str, Any] = {
        role: evaluate_predictions(
            y_true, calibrated(predictors[role], logits[role]), predictors[role].meta.operating_point
        )
        for role in ("teacher", "student")
    }
    rows = sorted({r.row for r in student_runs})
    by_row = {row: [r for r in student_runs if r.row == row] for row in rows}
    for row, members in by_row.items():
        best = max(members, key=lambda r: CheckpointMeta.read(runs / r.name).selection_score())
        key = "scratch" if row == "mobilenetv3_scratch" else row
        if row != "mobilenetv3_kd":
            summary[key] = {"run": best.name, **evaluations[best.name]}
    summary["student"] = {"run": student.name, **summary["student"]}
    summary["teacher"] = {"run": teacher.name, **summary["teacher"]}
    ablation = {
        row: {k: mean_std([evaluations[r.name][k] for r in members]) for k in ABLATION}
        for row, members in by_row.items()
    }
    summary["ablation_mean_std"] = ablation
    summary["per_seed"] = {name: {k: e[k] for k in ABLATION} for name, e in evaluations.items()}
    summary["teacher_selection"] = {
        p.name: {
            **CheckpointMeta.read(p).validation,
            "budget_epochs": budget,
            "val_balanced_accuracy_within_budget": CheckpointMeta.read(p).selection_score(budget)[0],
            "val_loss_within_budget": -CheckpointMeta.read(p).selection_score(budget)[1],
        }
        for p in teachers
    }
    summary["calibration"] = {
        role: {
            "temperature": predictors[role].meta.calibration_temperature,
            "test_ece_before": expected_calibration_error(y_true, _softmax(logits[role])),
            "test_ece_after": expected_calibration_error(y_true, calibrated(predictors[role], logits[role])),
            **CheckpointMeta.read(p).calibration,
        }
        for role, p in (("teacher", teacher), ("student", student))
    }
    summary["localisation"] = {role: pointing_game(p, data) for role, p in predictors.items()}
    summary["efficiency"] = efficiency
    summary["teacher_fp16_test_agreement"] = fp16_agreement(teacher, data, logits["teacher"])
    summary["cross_validation"] = {
        row: {"run": cv["name"], "folds": len(cv["folds"]), "k": cv["k"], **cv["mean_std"]}
        for row, cv in context.get("cross_validation", {}).items()
    }
    summary["external"] = context.get("external", {})
    summary["split"] = {s: len(data.records[s]) for s in data.records}
    summary["split_sha256"] = data.split_sha256
    (reports_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    write_markdown(summary, reports_dir)
    write_figures(summary, y_true, logits, predictors, teacher, student, reports_dir)
    return summary


def results_section(summary: dict[str, Any]) -> str:
    """The README's results block: headline table, ablation, localisation, calibration."""
    headline = [
        "| model (test split, n={}) | accuracy | balanced acc | macro-F1 | malignant recall | AUC mal-vs-ben "
        "| CV accuracy (train+val) | CV AUC |".format(summary["teacher"]["n"]),
        "|---|---|---|---|---|---|---|---|",
    ]
    cross_validation = summary.get("cross_validation", {})
    for role in ("teacher", "student", "scratch"):
        if role in summary:
            headline.append(
                f"| {role} (`{summary[role]['run']}`) | "
                + " | ".join(with_ci(summary[role], k) for k in HEADLINE)
                + f" | {cv_cells(cross_validation.get(role))} |"
            )
    headline.append(
        f"| paper (leaky protocol): teacher / student / scratch | {PAPER_ACCURACY['teacher']:.3f} / "
        f"{PAPER_ACCURACY['student']:.3f} / {PAPER_ACCURACY['scratch']:.3f} | | | | | | |"
    )
    loc, cal = summary["localisation"], summary["calibration"]
    return "\n".join(
        [
            "\n".join(headline),
            "",
            "Seeds (mean ± std over student seeds; the teacher is one run):",
            "",
            ablation_table(summary),
            external_section(summary.get("external", {})),
            "Grad-CAM pointing game on lesion test images (peak inside the lesion mask): "
            + ", ".join(f"{k} {v['pointing_game']:.3f} (n={v['n']})" for k, v in loc.items())
            + f"; chance {loc['student']['chance_rate']:.3f}.",
            "",
            "Calibration (temperature fitted on validation): "
            + ", ".join(
                f"{k} T={v['temperature']:.2f}, test ECE {v['test_ece_before']:.3f} → {v['test_ece_after']:.3f}"
                for k, v in cal.items()
            )
            + ".",
            "",
            "Per-class Table 1, efficiency (benchmark.md), confusion matrices, ROC, reliability and training curves: "
            "[`reports/`](reports/).",
            "",
        ]
    )


def cv_cells(cv: dict[str, Any] | None) -> str:
    """Two table cells: the recipe's CV accuracy and AUC (mean ± std, folds run of k)."""
    if cv is None:
        return "not cross-validated | "
    folds = f" ({cv['folds']}/{cv['k']} folds)"
    return f"{_fmt(cv['accuracy'])}{folds} | {_fmt(cv['auc_malignant_vs_benign'])}"


def external_section(external: dict[str, dict[str, Any]]) -> str:
    """The shipped models on another hospital's images (never trained or tuned on)."""
    if not external:
        return "External check: not run (no external folder).\n"
    keys = ("accuracy", "malignant_recall", "auc_malignant_vs_benign")
    first = next(iter(external.values()))
    lines = [
        f"External check, `{Path(first['data']).name}` (another hospital, n={first['n']}; never trained or tuned "
        "on; verdicts at the operating point chosen on BUSI validation):",
        "",
        "| model | " + " | ".join(keys) + " | sensitivity / specificity at the threshold |",
        "|---|" + "---|" * len(keys) + "---|",
    ]
    for role, scores in external.items():
        rule = scores.get("operating_point") or {}
        rates = f"{rule['sensitivity']:.3f} / {rule['specificity']:.3f}" if rule else "n/a"
        lines.append(f"| {role} | " + " | ".join(with_ci(scores, k) for k in keys) + f" | {rates} |")
    return "\n".join(lines) + "\n"


def write_markdown(summary: dict[str, Any], out: Path) -> None:
    (out / "results.md").write_text(results_section(summary))
    (out / "table1_per_class.md").write_text(table1(summary["teacher"], summary["student"]))
    (out / "kd_ablation.md").write_text(ablation_table(summary))
    loc = summary["localisation"]
    (out / "localisation.md").write_text(
        "| model | lesion test images | CAM peak inside lesion | chance (mean mask area) |\n|---|---|---|---|\n"
        + "".join(f"| {k} | {v['n']} | {v['pointing_game']:.3f} | {v['chance_rate']:.3f} |\n" for k, v in loc.items())
    )
    cal = summary["calibration"]
    (out / "calibration.md").write_text(
        "| model | temperature (fit on val) | val ECE before | val ECE after | test ECE before | test ECE after |\n"
        "|---|---|---|---|---|---|\n"
        + "".join(
            f"| {k} | {v['temperature']:.3f} | {v['val_ece_before']:.3f} | {v['val_ece_after']:.3f} | "
            f"{v['test_ece_before']:.3f} | {v['test_ece_after']:.3f} |\n"
            for k, v in cal.items()
        )
    )
    sel = summary["teacher_selection"]
    selection_table = out / "teacher_selection.md"
    if len(sel) < 2:  # one teacher: nothing was compared on validation
        selection_table.unlink(missing_ok=True)
    else:
        selection_table.write_text(
            "| teacher variant | best epoch | best val balanced acc (val loss) | same within first N epochs |\n"
            "|---|---|---|---|\n"
            + "".join(
                f"| {k} | {v['epoch']} | {v['val_balanced_accuracy']:.3f} ({v['val_loss']:.3f}) | "
                f"N={v['budget_epochs']}: {v['val_balanced_accuracy_within_budget']:.3f} "
                f"({v['val_loss_within_budget']:.3f}) |\n"
                for k, v in sel.items()
            )
        )
    for role in ("teacher", "student", "scratch"):
        if role in summary:
            (out / f"test_{role}.md").write_text(markdown_table(summary[role], f"{role} — test split"))


def write_figures(
    summary: dict[str, Any],
    y_true: np.ndarray,
    logits: dict[str, np.ndarray],
    predictors: dict[str, Predictor],
    teacher: Path,
    student: Path,
    out: Path,
) -> None:
    for role in ("teacher", "student", "scratch"):
        if role in summary:
            plot_confusion_matrix(summary[role], out / f"confusion_{role}.png", f"{role} (test)")
    probs = {role: calibrated(predictors[role], logits[role]) for role in logits}
    plot_roc({role: (y_true, p) for role, p in probs.items()}, out / "roc_malignant_vs_benign.png")
    for role, path in (("teacher", teacher), ("student", student)):
        plot_reliability(y_true, probs[role], out / f"reliability_{role}.png", f"{role} (test, calibrated)")
        history, figure = list(CheckpointMeta.read(path).history), out / f"training_{role}.png"
        if all("train_loss" in h for h in history):
            plot_training_curves(history, figure, role)
        else:  # a head fitted in one go (linear probe): no epochs to draw, and no stale figure kept
            figure.unlink(missing_ok=True)
