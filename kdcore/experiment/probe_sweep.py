"""Which frozen features make the best linear-probe teacher: a cross-validated sweep.

python -m kdcore.experiment.probe_sweep --out reports/cv/probe_sweep.md

For each feature set (which ImageNet EfficientNet-Lites, input size, which stages are pooled,
mean or mean + max pooling) and each L2 strength C, the probe of ``kdcore.probe`` is fitted on
four folds of train+val and scored on the fifth: the same group-aware folds as ``train.py cv``,
the test split never read. Features are flip-averaged maps, as ``FeatureEnsemble`` computes
them, extracted once per network and size and cached. Each row is compared with the shipped
teacher's recipe on the same folds (paired differences), because the best of many rows on five
folds is optimistic by itself.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdcore.config import CLASS_NAMES, DEFAULT_DATA_DIR, DEFAULT_SPLIT_FILE, REPO_ROOT
from kdcore.experiment.cv import fold_data
from kdcore.experiment.protocol import BusiData, load_busi
from kdcore.metrics import fast_headline
from kdcore.models import Normalize, create_backbone, mirror_average
from kdcore.probe import fit_standardised_probe

BLOCK_TAPS = {"block4": 4, "block5": 5, "block6": 6}  # EfficientNet stage outputs (stride 16, 32, 32)
TAPS = (*BLOCK_TAPS, "head")  # head: the last map, what the shipped teacher pools


@dataclass(frozen=True)
class FeatureSet:
    """Which pooled maps a probe reads."""

    members: tuple[str, ...]
    size: int
    taps: tuple[str, ...]
    pooling: tuple[str, ...]  # "mean", "max"

    @property
    def label(self) -> str:
        nets = "+".join(m.removeprefix("tf_efficientnet_") for m in self.members)
        return f"{nets} {self.size}px {'+'.join(self.taps)} {'+'.join(self.pooling)}"


SHIPPED = FeatureSet(("tf_efficientnet_lite0", "tf_efficientnet_lite2"), 260, ("head",), ("mean",)), 0.01


@torch.no_grad()
def flip_averaged_taps(
    backbone: nn.Module, images: torch.Tensor, batch_size: int = 16
) -> Iterator[dict[str, torch.Tensor]]:
    """Per chunk of (N, 1, S, S) uint8 images, ``{tap: map}``: each tap's map averaged with
    its mirror image's (mirrored back), as ``FeatureEnsemble`` computes them in eval mode."""
    normalize = Normalize(backbone.pretrained_cfg["mean"], backbone.pretrained_cfg["std"])
    taps: dict[str, torch.Tensor] = {}
    hooks = [
        backbone.blocks[index].register_forward_hook(lambda _m, _i, out, tap=tap: taps.__setitem__(tap, out))
        for tap, index in BLOCK_TAPS.items()
    ]
    try:
        backbone.eval()
        for chunk in images.split(batch_size):
            x = normalize(chunk.float().expand(-1, 3, -1, -1) / 255.0)
            taps["head"] = backbone.forward_features(torch.cat([x, x.flip(3)]))
            yield {tap: mirror_average(both) for tap, both in taps.items()}
    finally:
        for hook in hooks:
            hook.remove()


def pooled_maps(backbone: nn.Module, images: torch.Tensor, batch_size: int = 16) -> dict[str, np.ndarray]:
    """``{f"{tap}/{pooling}": (N, C)}``: every tap's flip-averaged map, mean- and max-pooled."""
    pooled: dict[str, list[torch.Tensor]] = {}
    for taps in flip_averaged_taps(backbone, images, batch_size):
        for tap, averaged in taps.items():
            pooled.setdefault(f"{tap}/mean", []).append(averaged.mean(dim=(2, 3)))
            pooled.setdefault(f"{tap}/max", []).append(averaged.amax(dim=(2, 3)))
    return {key: torch.cat(parts).numpy() for key, parts in pooled.items()}


class FeatureCache:
    """Pooled maps of the train+val images per (network, size), computed once, kept on disk."""

    def __init__(self, images: dict[int, torch.Tensor], directory: Path, key: str) -> None:
        self.images, self.directory, self.key = images, directory, key
        self._loaded: dict[tuple[str, int], dict[str, np.ndarray]] = {}

    def maps(self, network: str, size: int) -> dict[str, np.ndarray]:
        if (network, size) not in self._loaded:
            path = self.directory / f"{network}_{size}_{self.key}.npz"
            if not path.is_file():
                started = time.time()
                path.parent.mkdir(parents=True, exist_ok=True)
                np.savez(path, **pooled_maps(create_backbone(network, "pypi", num_classes=0), self.images[size]))
                print(f"[probe sweep] features of {network} at {size} px: {time.time() - started:.0f} s", flush=True)
            with np.load(path) as stored:
                self._loaded[(network, size)] = dict(stored)
        return self._loaded[(network, size)]

    def features(self, feature_set: FeatureSet) -> torch.Tensor:
        parts = [
            self.maps(network, feature_set.size)[f"{tap}/{pooling}"]
            for network in feature_set.members
            for tap in feature_set.taps
            for pooling in feature_set.pooling
        ]
        return torch.from_numpy(np.concatenate(parts, axis=1)).float()


def cross_validated_probe(
    features: torch.Tensor, labels: torch.Tensor, folds: Sequence[tuple[np.ndarray, np.ndarray]], c: float
) -> list[dict[str, float | None]]:
    """Headline scores of the probe on each held-out fold."""
    scores = []
    for train, held_out in folds:
        probe = fit_standardised_probe(features[train], labels[train], len(CLASS_NAMES), c)
        probs = torch.softmax(probe.logits(features[held_out]), dim=1).numpy()
        scores.append(fast_headline(labels[held_out].numpy(), probs))
    return scores


def fold_indices(data: BusiData, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``train.py cv``'s folds (``fold_data``) as indices into train + val order."""
    position = {r.file: i for i, r in enumerate(data.records["train"] + data.records["val"])}
    folds = [fold_data(data, fold, k).records for fold in range(k)]
    return [tuple(np.array([position[r.file] for r in fold[side]]) for side in ("train", "val")) for fold in folds]


def mean_std(values: Sequence[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.3f}"


def sweep_table(rows: list[tuple[FeatureSet, float, int, list[dict[str, float | None]]]]) -> str:
    """Markdown: one row per (feature set, C), with the paired accuracy difference to the shipped recipe."""
    shipped = next((scores for fs, c, _, scores in rows if (fs, c) == SHIPPED), None)
    k = len(rows[0][3])
    lines = [
        "| features | C | width | accuracy | balanced accuracy | AUC mal vs ben | Δ accuracy vs shipped (paired) | "
        + " | ".join(f"fold {f}" for f in range(k)) + " |",
        "|---|---|---|---|---|---|---|" + "---|" * k,
    ]  # fmt: skip
    for feature_set, c, width, scores in rows:
        accuracy = [s["accuracy"] for s in scores]
        delta = mean_std([a - s["accuracy"] for a, s in zip(accuracy, shipped)]) if shipped else "—"
        aucs = [s["auc_malignant_vs_benign"] for s in scores if s["auc_malignant_vs_benign"] is not None]
        lines.append(
            f"| {feature_set.label} | {c:g} | {width} | {mean_std(accuracy)} | "
            f"{mean_std([s['balanced_accuracy'] for s in scores])} | {mean_std(aucs) if aucs else '—'} | "
            f"{delta} | " + " | ".join(f"{a:.3f}" for a in accuracy) + " |"
        )
    return "\n".join(lines) + "\n"


def run_sweep(args: argparse.Namespace, command: str) -> str:
    """Every (feature set, C) of the grid in ``args``; returns the report's Markdown."""
    torch.manual_seed(0)
    data = load_busi(args.data, args.split_file, subset=args.subset)
    labels = torch.cat([data.labels["train"], data.labels["val"]])
    images = {size: torch.cat([data.images("train", size), data.images("val", size)]) for size in args.sizes}
    key = hashlib.sha256("".join(r.sha256 for r in data.records["train"] + data.records["val"]).encode()).hexdigest()
    cache = FeatureCache(images, args.cache, key[:12])
    folds = fold_indices(data, args.k)
    grid = [
        FeatureSet(tuple(members.split("+")), size, tuple(taps.split("+")), tuple(pooling.split("+")))
        for members, size, taps, pooling in itertools.product(args.members, args.sizes, args.taps, args.pooling)
    ]
    started = time.time()
    rows = []
    for feature_set in grid:
        features = cache.features(feature_set)
        for c in args.cs:
            rows.append((feature_set, c, features.shape[1], cross_validated_probe(features, labels, folds, c)))
    header = (
        f"# Linear-probe teacher: feature sweep\n\n`{command}`\n\n{args.k}-fold group-aware CV on "
        f"train+val ({len(labels)} images, the folds of `train.py cv`; the test split is not read). "
        "Probe: class-balanced L2 logistic regression on standardised features (`kdcore.probe`), "
        f"flip-averaged maps. Shipped teacher: {SHIPPED[0].label}, C {SHIPPED[1]:g}. "
        "Mean ± std over folds; Δ: this row's accuracy minus the shipped recipe's, fold by fold. "
        f"{len(rows)} rows in {time.time() - started:.0f} s (features not already cached included), "
        f"{os.cpu_count()} CPU cores.\n\n"
    )
    return header + sweep_table(rows)


def command_line(module: str, argv: list[str] | None) -> str:
    """How the report's command was typed (``argv`` None: this process's own arguments)."""
    return " ".join(["python -m " + module, *(sys.argv[1:] if argv is None else argv)])


def write_report(out: Path, report: str) -> int:
    """Write a Markdown report (folders made as needed); the command's exit code."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(f"wrote {out}")
    return 0


def cv_report_parser(description: str, name: str) -> argparse.ArgumentParser:
    """Arguments every frozen-feature CV report takes: data, folds, where the report and the
    feature cache go (``reports/cv/{name}.md``, ``runs/{name}``)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--split-file", type=Path, default=DEFAULT_SPLIT_FILE)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "reports" / "cv" / f"{name}.md")
    parser.add_argument("--cache", type=Path, default=REPO_ROOT / "runs" / name, help="feature cache folder")
    parser.add_argument("--k", type=int, default=5, help="folds")
    parser.add_argument("--subset", type=int, default=0, help="at most N images per split (smoke runs)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = cv_report_parser(__doc__, "probe_sweep")
    parser.add_argument(
        "--members", nargs="+", default=["tf_efficientnet_lite0+tf_efficientnet_lite2",
        "tf_efficientnet_lite0+tf_efficientnet_lite1+tf_efficientnet_lite2"], help="'+'-joined timm names",
    )  # fmt: skip
    parser.add_argument("--sizes", type=int, nargs="+", default=[260, 320])
    parser.add_argument("--taps", nargs="+", default=["head", "block5+head", "block4+block5+block6"])
    parser.add_argument("--pooling", nargs="+", default=["mean", "mean+max"])
    parser.add_argument("--cs", type=float, nargs="+", default=[0.003, 0.01, 0.03, 0.1])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    unknown = {tap for taps in args.taps for tap in taps.split("+")} - set(TAPS)
    if unknown:
        print(f"unknown tap(s) {sorted(unknown)}: choose from {TAPS}", file=sys.stderr)
        return 2
    return write_report(args.out, run_sweep(args, command_line("kdcore.experiment.probe_sweep", argv)))


if __name__ == "__main__":
    raise SystemExit(main())
