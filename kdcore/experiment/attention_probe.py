"""Does pooling the teacher's features where the lesion is help its linear probe? A CV check.

python -m kdcore.experiment.attention_probe --out reports/cv/attention_probe.md

The shipped teacher average-pools its frozen EfficientNet-Lite maps over the whole image. Here a
per-position lesion scorer (logistic regression on the standardised channels of one map cell,
its target the share of the cell inside the BUSI lesion mask, 0 for normal images) weights the
cells, and the probe reads the attention-pooled features alone or next to the mean-pooled ones.
Each fold's scorer is fitted on that fold's training images only; the probe's training features
take their attention from inner cross-fitting (a scorer that never saw the image's near-duplicate
group), so training and held-out attention are made the same way. Same folds as ``train.py cv``;
the test split is not read. Also reported: the pointing game of the scorer's map on each
held-out fold's lesion images.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kdcore.config import CLASS_NAMES
from kdcore.experiment.probe_sweep import (
    command_line,
    cv_report_parser,
    flip_averaged_taps,
    fold_indices,
    mean_std,
    write_report,
)
from kdcore.experiment.protocol import load_busi
from kdcore.metrics import fast_headline
from kdcore.models import create_backbone
from kdcore.probe import StandardisedProbe, fit_standardised_probe, standardised

POOLINGS = ("mean", "attention", "mean+attention")  # "mean" is the shipped teacher's pooling


def cell_scores(scorer: StandardisedProbe, maps: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) maps -> (N, H, W) lesion logits of a one-output probe applied to every cell."""
    n, c, h, w = maps.shape
    return scorer.logits(maps.permute(0, 2, 3, 1).reshape(-1, c)).reshape(n, h, w)


def lesion_cover(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(N, 1, S, S) 0/1 masks -> (N, H, W): the share of each map cell inside a lesion."""
    return F.adaptive_avg_pool2d(masks.float(), grid)[:, 0]


def fit_lesion_scorer(maps: torch.Tensor, cover: torch.Tensor, l2: float) -> StandardisedProbe:
    """Minimise the mean cell-wise binary cross-entropy to ``cover`` + ``l2 * ||w||^2`` (L-BFGS)."""
    cells = maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])
    mean, var = cells.mean(0), cells.var(0, unbiased=False)
    x, target = standardised(cells, mean, var), cover.reshape(-1)
    weight = torch.zeros(1, x.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=300, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits((x @ weight.T + bias)[:, 0], target) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return StandardisedProbe(mean, var, weight.detach(), bias.detach())


def attention_pool(maps: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """(N, C): the cells' features weighted by their sigmoid lesion scores (normalised per image)."""
    weights = torch.sigmoid(scores) + 1e-6
    return torch.einsum("nchw,nhw->nc", maps, weights / weights.sum(dim=(1, 2), keepdim=True))


def inner_folds(groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    """An inner fold in ``range(k)`` per image, the same for every image of a group."""
    unique = np.unique(groups)
    fold_of = dict(zip(unique, np.random.default_rng(seed).integers(0, k, len(unique))))
    return np.array([fold_of[g] for g in groups])


def cross_fitted_scores(
    maps: torch.Tensor, cover: torch.Tensor, groups: np.ndarray, l2: float, k: int = 4, seed: int = 0
) -> torch.Tensor:
    """Each image's lesion scores from a scorer fitted on the other inner folds' images."""
    inner = inner_folds(groups, k, seed)
    scores = torch.zeros(len(maps), *maps.shape[-2:])
    for fold in np.unique(inner):
        fitted = fit_lesion_scorer(maps[inner != fold], cover[inner != fold], l2)
        scores[inner == fold] = cell_scores(fitted, maps[inner == fold])
    return scores


def pointing_hits(scores: torch.Tensor, masks: torch.Tensor) -> list[bool]:
    """Per image with a lesion: does the (bilinearly upsampled) score map peak inside it?"""
    upsampled = F.interpolate(scores[:, None], size=masks.shape[-2:], mode="bilinear", align_corners=False)
    return [
        bool(mask.reshape(-1)[int(score.argmax())]) for score, mask in zip(upsampled[:, 0], masks[:, 0]) if mask.any()
    ]


def pooled_features(maps: torch.Tensor, scores: torch.Tensor, pooling: str) -> torch.Tensor:
    """The probe's input for one of ``POOLINGS``."""
    parts = {"mean": maps.mean(dim=(2, 3)), "attention": attention_pool(maps, scores)}
    return torch.cat([parts[name] for name in pooling.split("+")], dim=1)


def fold_scores(
    maps: torch.Tensor,
    labels: torch.Tensor,
    masks: torch.Tensor,
    groups: np.ndarray,
    folds: list[tuple[np.ndarray, np.ndarray]],
    c: float,
    l2: float,
) -> tuple[dict[str, list[dict[str, float | None]]], list[float]]:
    """Per pooling, the probe's headline scores on each held-out fold; the scorer's pointing game per fold."""
    cover = lesion_cover(masks, maps.shape[-2:])
    scores: dict[str, list[dict[str, float | None]]] = {pooling: [] for pooling in POOLINGS}
    pointing = []
    for fold, (train, held_out) in enumerate(folds):
        train_maps, held_maps = maps[train], maps[held_out]  # one copy of each side per fold
        held_scores = cell_scores(fit_lesion_scorer(train_maps, cover[train], l2), held_maps)
        train_scores = cross_fitted_scores(train_maps, cover[train], groups[train], l2, seed=fold)
        for pooling in POOLINGS:
            probe = fit_standardised_probe(
                pooled_features(train_maps, train_scores, pooling), labels[train], len(CLASS_NAMES), c
            )
            probs = torch.softmax(probe.logits(pooled_features(held_maps, held_scores, pooling)), dim=1)
            scores[pooling].append(fast_headline(labels[held_out].numpy(), probs.numpy()))
        hits = pointing_hits(held_scores, masks[held_out])
        pointing.append(float(np.mean(hits)) if hits else float("nan"))
    return scores, pointing


def report_table(scores: dict[str, list[dict[str, float | None]]], pointing: list[float]) -> str:
    """Markdown: one row per pooling, with the fold-by-fold accuracy difference to mean pooling."""
    baseline = [s["accuracy"] for s in scores["mean"]]
    lines = [
        "| pooling | accuracy | balanced accuracy | AUC mal vs ben | Δ accuracy vs mean (paired) | folds ahead | "
        + " | ".join(f"fold {f}" for f in range(len(baseline))) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(baseline),
    ]  # fmt: skip
    for pooling, rows in scores.items():
        accuracy = [s["accuracy"] for s in rows]
        aucs = [s["auc_malignant_vs_benign"] for s in rows if s["auc_malignant_vs_benign"] is not None]
        lines.append(
            f"| {pooling} | {mean_std(accuracy)} | {mean_std([s['balanced_accuracy'] for s in rows])} | "
            f"{mean_std(aucs) if aucs else '—'} | {mean_std([a - b for a, b in zip(accuracy, baseline)])} | "
            f"{sum(a > b for a, b in zip(accuracy, baseline))}/{len(baseline)} | "
            + " | ".join(f"{a:.3f}" for a in accuracy) + " |"
        )  # fmt: skip
    lines.append(f"\nLesion scorer's pointing game on the held-out lesion images: {mean_std(pointing)} per fold.")
    return "\n".join(lines) + "\n"


@torch.no_grad()
def head_maps(network: str, images: torch.Tensor, cache: Path) -> torch.Tensor:
    """(N, C, H, W) flip-averaged last maps of one network, computed once and cached (fp16)."""
    if not cache.is_file():
        backbone = create_backbone(network, "pypi", num_classes=0)
        maps = torch.cat([taps["head"].half() for taps in flip_averaged_taps(backbone, images)])
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(maps, cache)
    return torch.load(cache, weights_only=True).float()


def run(args: argparse.Namespace, command: str) -> str:
    """The three poolings on every fold; returns the report's Markdown."""
    started = time.time()
    data = load_busi(args.data, args.split_file, subset=args.subset)
    records = data.records["train"] + data.records["val"]
    labels = torch.cat([data.labels["train"], data.labels["val"]])
    images = torch.cat([data.images("train", args.size), data.images("val", args.size)])
    masks = torch.cat([data.lesion_masks("train", args.size), data.lesion_masks("val", args.size)])
    key = hashlib.sha256("".join(r.sha256 for r in records).encode()).hexdigest()[:12]
    maps = torch.cat(
        [head_maps(net, images, args.cache / f"{net}_{args.size}_{key}_maps.pt") for net in args.members], dim=1
    )
    groups = np.array([r.group for r in records])
    scores, pointing = fold_scores(maps, labels, masks, groups, fold_indices(data, args.k), args.c, args.l2)
    header = (
        f"# Linear-probe teacher: lesion-attention pooling\n\n`{command}`\n\n{args.k}-fold group-aware CV on "
        f"train+val ({len(labels)} images, the folds of `train.py cv`; the test split is not read). "
        f"Features: flip-averaged last maps of {' + '.join(args.members)} at {args.size} px "
        f"({maps.shape[-2]}×{maps.shape[-1]} cells); probe C {args.c:g} (the shipped teacher's), scorer L2 "
        f"{args.l2:g}, both fixed before the run. `mean` is the shipped teacher's pooling. "
        f"{time.time() - started:.0f} s on {os.cpu_count()} CPU cores (features not already cached included).\n\n"
    )
    return header + report_table(scores, pointing)


def build_parser() -> argparse.ArgumentParser:
    parser = cv_report_parser(__doc__, "attention_probe")
    parser.add_argument("--members", nargs="+", default=["tf_efficientnet_lite0", "tf_efficientnet_lite2"])
    parser.add_argument("--size", type=int, default=260)
    parser.add_argument("--c", type=float, default=0.01, help="probe L2 strength (scikit-learn's C)")
    parser.add_argument("--l2", type=float, default=1e-4, help="lesion scorer's L2 penalty")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return write_report(args.out, run(args, command_line("kdcore.experiment.attention_probe", argv)))


if __name__ == "__main__":
    raise SystemExit(main())
