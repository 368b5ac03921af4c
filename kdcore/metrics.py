"""Classification metrics with bootstrap intervals, calibration, and their plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.stats import rankdata  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from kdcore.config import CLASS_NAMES  # noqa: E402
from kdcore.operating_point import POSITIVE_CLASS, OperatingPoint, decide, sensitivity_specificity  # noqa: E402

BOOTSTRAP_ROUNDS = 1000


def malignant_vs_benign(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels (1 = malignant) and scores p_mal / (p_mal + p_ben) on benign + malignant images."""
    benign, malignant = CLASS_NAMES.index("benign"), CLASS_NAMES.index("malignant")
    keep = np.isin(y_true, [benign, malignant])
    p_b, p_m = probs[keep, benign], probs[keep, malignant]
    return (y_true[keep] == malignant).astype(int), p_m / np.clip(p_b + p_m, 1e-12, None)


def auc_malignant_vs_benign(y_true: np.ndarray, probs: np.ndarray) -> float | None:
    labels, scores = malignant_vs_benign(y_true, probs)
    return float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else None


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, bins: int = 10) -> float:
    """Top-label ECE with equal-width confidence bins."""
    confidence = probs.max(1)
    correct = probs.argmax(1) == y_true
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def calibrated_model_ece(probs: np.ndarray, n: int, draws: int = 1000, seed: int = 0) -> dict[str, float | int]:
    """The ECE that a perfectly calibrated model with these predicted probabilities would show
    on ``n`` images (images resampled, each label drawn from the model's own probabilities):
    the estimator's noise floor at that sample size, as its mean and 95 % range. No labels are
    read, so it may be computed on any split."""
    rng = np.random.default_rng(seed)
    eces = []
    for _ in range(draws):
        sample = probs[rng.integers(0, len(probs), n)]
        sample = sample / sample.sum(1, keepdims=True)
        drawn = (rng.random((n, 1)) > sample.cumsum(1)).sum(1)
        eces.append(expected_calibration_error(drawn, sample))
    low, high = np.percentile(eces, [2.5, 97.5])
    return {"n": n, "mean": float(np.mean(eces)), "low": float(low), "high": float(high)}


def _headline(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float | None]:
    """Accuracy, balanced accuracy (mean recall of the classes present), macro-F1, AUC."""
    y_pred = probs.argmax(1)
    present = sorted(set(y_true.tolist()))
    malignant = CLASS_NAMES.index("malignant")
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(np.mean([np.mean(y_pred[y_true == c] == c) for c in present])),
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "malignant_recall": (
            float(np.mean(y_pred[y_true == malignant] == malignant)) if (y_true == malignant).any() else None
        ),
        "auc_malignant_vs_benign": auc_malignant_vs_benign(y_true, probs),
    }


def _fast_auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC as the Mann-Whitney statistic (ties averaged); equals sklearn's roc_auc_score."""
    positives = labels == 1
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(scores)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def fast_headline(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float | None]:
    """The same numbers as ``_headline`` from one confusion matrix, fast enough to bootstrap."""
    n_classes = len(CLASS_NAMES)
    y_pred = probs.argmax(1)
    cm = np.bincount(y_true * n_classes + y_pred, minlength=n_classes**2).reshape(n_classes, n_classes)
    present = cm.sum(1) > 0
    tp = np.diag(cm)
    recall = tp[present] / cm.sum(1)[present]
    f1 = 2 * tp / np.clip(cm.sum(0) + cm.sum(1), 1, None)
    malignant = CLASS_NAMES.index("malignant")
    return {
        "accuracy": float(tp.sum() / len(y_true)),
        "balanced_accuracy": float(recall.mean()),
        "macro_f1": float(f1[present].mean()),
        "malignant_recall": float(tp[malignant] / cm[malignant].sum()) if present[malignant] else None,
        "auc_malignant_vs_benign": _fast_auc(*malignant_vs_benign(y_true, probs)),
    }


def bootstrap_intervals(
    y_true: np.ndarray, probs: np.ndarray, rounds: int = BOOTSTRAP_ROUNDS, seed: int = 0
) -> dict[str, list[float] | None]:
    """Percentile 95% intervals of the headline metrics over image resamples."""
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {}
    for _ in range(rounds):
        idx = rng.integers(0, len(y_true), len(y_true))
        for key, value in fast_headline(y_true[idx], probs[idx]).items():
            if value is not None:
                samples.setdefault(key, []).append(value)
    return {
        key: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v) > rounds // 2 else None
        for key, v in samples.items()
    }


def at_operating_point(y_true: np.ndarray, probs: np.ndarray, point: OperatingPoint) -> dict[str, Any]:
    """Sensitivity, specificity, accuracy and confusion matrix of the checkpoint's verdict rule."""
    positive = CLASS_NAMES.index(POSITIVE_CLASS)
    sensitivity, specificity = sensitivity_specificity(probs[:, positive], y_true == positive, point.threshold)
    y_pred = decide(probs, CLASS_NAMES, point)
    return {
        "threshold": point.threshold,
        "chosen_on": point.source,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "accuracy": float(np.mean(y_pred == y_true)),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=list(range(len(CLASS_NAMES)))).tolist(),
    }


def evaluate_predictions(y_true: np.ndarray, probs: np.ndarray, point: OperatingPoint | None = None) -> dict[str, Any]:
    """The evaluation JSON: headline metrics (most probable class), per-class P/R/F1, confusion
    matrix, ECE, 95% CIs, and the scores of the verdict rule when ``point`` is given."""
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    y_pred = probs.argmax(1)
    labels = list(range(len(CLASS_NAMES)))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    result: dict[str, Any] = {"n": int(len(y_true)), **_headline(y_true, probs)}
    result["per_class"] = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(CLASS_NAMES)
    }
    result["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=labels).tolist()
    result["ece"] = expected_calibration_error(y_true, probs)
    result["ci95"] = bootstrap_intervals(y_true, probs)
    result["class_names"] = list(CLASS_NAMES)
    result["operating_point"] = at_operating_point(y_true, probs, point) if point else None
    # Sanity: sklearn's balanced accuracy agrees when every class is present.
    if len(set(y_true.tolist())) == len(CLASS_NAMES):
        assert abs(result["balanced_accuracy"] - balanced_accuracy_score(y_true, y_pred)) < 1e-9
    return result


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Temperature minimising NLL on held-out (validation) logits."""
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def markdown_table(result: dict[str, Any], title: str) -> str:
    """Per-class table plus headline metrics with intervals, as Markdown."""
    ci = result.get("ci95", {})

    def with_ci(key: str) -> str:
        value = result.get(key)
        if value is None:
            return "n/a"
        bounds = ci.get(key)
        return f"{value:.3f} [{bounds[0]:.3f}, {bounds[1]:.3f}]" if bounds else f"{value:.3f}"

    lines = [f"### {title}", "", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for name, row in result["per_class"].items():
        lines.append(f"| {name} | {row['precision']:.3f} | {row['recall']:.3f} | {row['f1']:.3f} | {row['support']} |")
    lines += ["", "| metric | value [95% CI] |", "|---|---|"]
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "malignant_recall", "auc_malignant_vs_benign"):
        lines.append(f"| {key} | {with_ci(key)} |")
    lines.append(f"| ece | {result['ece']:.3f} |")
    lines.append(f"| n | {result['n']} |")
    if point := result.get("operating_point"):
        lines.append(
            f"\nVerdict rule (malignant when p(malignant) >= {point['threshold']:.3f}, chosen on the "
            f"{point['chosen_on']}): sensitivity {point['sensitivity']:.3f}, specificity "
            f"{point['specificity']:.3f}, accuracy {point['accuracy']:.3f}"
        )
    return "\n".join(lines) + "\n"


def plot_confusion_matrix(result: dict[str, Any], path: Path, title: str) -> None:
    cm = np.array(result["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES)
    ax.set_yticks(range(len(CLASS_NAMES)), CLASS_NAMES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> None:
    """Malignant-vs-benign ROC curves, one per model name."""
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    for name, (y_true, probs) in curves.items():
        labels, scores = malignant_vs_benign(np.asarray(y_true), np.asarray(probs))
        if len(np.unique(labels)) == 2:
            fpr, tpr, _ = roc_curve(labels, scores)
            ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(labels, scores):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate (malignant)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_reliability(y_true: np.ndarray, probs: np.ndarray, path: Path, title: str, bins: int = 10) -> None:
    confidence, correct = probs.max(1), probs.argmax(1) == y_true
    edges = np.linspace(0, 1, bins + 1)
    centres, accs = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            centres.append(confidence[in_bin].mean())
            accs.append(correct[in_bin].mean())
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.plot(centres, accs, "o-")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title} (ECE {expected_calibration_error(y_true, probs):.3f})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_training_curves(history: list[dict[str, float]], path: Path, title: str) -> None:
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3.2))
    ax1.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    ax1.plot(epochs, [h["val_loss"] for h in history], label="val CE")
    ax1.legend()
    ax2.plot(epochs, [h["val_balanced_accuracy"] for h in history], label="val balanced acc")
    ax2.plot(epochs, [h["val_accuracy"] for h in history], label="val accuracy")
    ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
