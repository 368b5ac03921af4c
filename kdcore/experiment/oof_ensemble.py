"""What an ensemble of cross-validated recipes would score, from their out-of-fold predictions.

python -m kdcore.experiment.oof_ensemble ens_lite0_lite2_260_flip_probe_c0.01+ens_lite0_260_flip_lpft_e8

Each argument is a '+'-joined list of CV result names in ``reports/cv/``. Their out-of-fold
probabilities (every held-out image of every fold, scored by the fold's model) are averaged per
image and scored per fold, beside each member alone and with the paired accuracy difference to
``--baseline`` (by default the offline preset's teacher). No model is trained or run: members
must be CV runs on the same folds, which is checked image by image. Ensembles are priced by
their members: each one has to be trained and run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from kdcore.config import CLASS_NAMES, OFFLINE, REPO_ROOT
from kdcore.experiment.probe_sweep import command_line, mean_std
from kdcore.metrics import fast_headline

CV_DIR = REPO_ROOT / "reports" / "cv"


def out_of_fold(result: dict[str, Any]) -> dict[int, dict[str, tuple[int, np.ndarray]]]:
    """A CV result's held-out predictions: fold -> file -> (label index, probabilities)."""
    return {
        fold["fold"]: {
            file: (CLASS_NAMES.index(label), np.asarray(probs, dtype=np.float64))
            for file, label, probs in zip(fold["files"], fold["labels"], fold["probabilities"])
        }
        for fold in result["folds"]
    }


def ensemble_fold_scores(results: dict[str, dict[str, Any]]) -> list[dict[str, float | None]]:
    """Per-fold headline scores of the members' averaged out-of-fold probabilities."""
    predictions = {name: out_of_fold(result) for name, result in results.items()}
    first_name, first = next(iter(predictions.items()))
    scores = []
    for fold, held_out in sorted(first.items()):
        for name, other in predictions.items():
            if set(other.get(fold, {})) != set(held_out):
                raise ValueError(
                    f"{name} and {first_name} hold out different images in fold {fold}: not the same folds"
                )
        files = sorted(held_out)
        labels = np.array([held_out[file][0] for file in files])
        probs = np.mean([[other[fold][file][1] for file in files] for other in predictions.values()], axis=0)
        scores.append(fast_headline(labels, probs))
    return scores


def ensemble_table(ensembles: list[list[str]], baseline: str, cv_dir: Path) -> str:
    """Markdown: one row per member and per ensemble, with the paired accuracy difference to ``baseline``."""
    rows = [[baseline], *([name] for names in ensembles for name in names), *ensembles]
    unique = list(dict.fromkeys(tuple(row) for row in rows))
    loaded = {name: json.loads((cv_dir / f"{name}.json").read_text()) for row in unique for name in row}
    reference = ensemble_fold_scores({baseline: loaded[baseline]})
    k = len(reference)
    lines = [
        "| recipe (out-of-fold probabilities averaged) | accuracy | balanced accuracy | malignant recall | "
        f"AUC mal vs ben | Δ accuracy vs {baseline} (paired) | folds ahead | "
        + " | ".join(f"fold {f}" for f in range(k)) + " |",
        "|---|---|---|---|---|---|---|" + "---|" * k,
    ]  # fmt: skip
    for row in unique:
        scores = ensemble_fold_scores({name: loaded[name] for name in row})
        if len(scores) != k:
            raise ValueError(f"{' + '.join(row)} has {len(scores)} folds, {baseline} {k}: not comparable")
        accuracy = [s["accuracy"] for s in scores]
        delta = [a - r["accuracy"] for a, r in zip(accuracy, reference)]
        lines.append(
            f"| {' + '.join(row)} | {mean_std(accuracy)} | {_column(scores, 'balanced_accuracy')} | "
            f"{_column(scores, 'malignant_recall')} | {_column(scores, 'auc_malignant_vs_benign')} | "
            f"{mean_std(delta)} | {sum(d > 0 for d in delta)}/{k} | " + " | ".join(f"{a:.3f}" for a in accuracy) + " |"
        )
    return "\n".join(lines) + "\n"


def _column(scores: list[dict[str, float | None]], key: str) -> str:
    values = [s[key] for s in scores if s[key] is not None]
    return mean_std(values) if values else "—"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ensembles", nargs="+", help="'+'-joined CV result names, one ensemble each")
    parser.add_argument("--baseline", default=dict(OFFLINE.cv_runs)["teacher"], help="CV result name to compare with")
    parser.add_argument("--cv-dir", type=Path, default=CV_DIR, help="folder of train.py cv result files")
    parser.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ensembles = [names.split("+") for names in args.ensembles]
    missing = sorted({n for names in ensembles for n in names} - {p.stem for p in args.cv_dir.glob("*.json")})
    if missing or not (args.cv_dir / f"{args.baseline}.json").is_file():
        print(f"no CV result for {missing or [args.baseline]} in {args.cv_dir}", file=sys.stderr)
        return 2
    try:
        table = ensemble_table(ensembles, args.baseline, args.cv_dir)
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    command = command_line("kdcore.experiment.oof_ensemble", argv)
    report = f"Out-of-fold ensembles: `{command}`\n\n{table}"
    if args.out:
        args.out.write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
