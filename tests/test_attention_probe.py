"""Lesion-attention pooling for the probe teacher: the scorer finds a planted lesion signal,
attention pools where it points, cross-fitting never scores an image with a scorer that saw its
group, and the command runs end to end on BUSI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import needs_busi

from kdcore.config import DEFAULT_DATA_DIR
from kdcore.experiment import attention_probe
from kdcore.experiment.attention_probe import (
    attention_pool,
    cell_scores,
    cross_fitted_scores,
    fit_lesion_scorer,
    inner_folds,
    lesion_cover,
    main,
    pointing_hits,
    report_table,
)

GRID, SIZE = 4, 32


def _planted(n: int = 24, channels: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Random maps whose channel 0 is high exactly in one lesion cell per image, and that lesion's masks."""
    generator = torch.Generator().manual_seed(0)
    maps = torch.randn(n, channels, GRID, GRID, generator=generator)
    masks = torch.zeros(n, 1, SIZE, SIZE, dtype=torch.uint8)
    cell = SIZE // GRID
    for i in range(n):
        row, col = i % GRID, (i // GRID) % GRID
        maps[i, 0, row, col] += 6.0
        masks[i, 0, row * cell : (row + 1) * cell, col * cell : (col + 1) * cell] = 1
    return maps, masks


def test_lesion_cover_is_the_share_of_each_cell_inside_the_mask():
    masks = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    masks[0, 0, :4, :2] = 1  # half of the top-left 4x4 cell
    cover = lesion_cover(masks, (2, 2))
    torch.testing.assert_close(cover, torch.tensor([[[0.5, 0.0], [0.0, 0.0]]]))


def test_scorer_learns_a_planted_lesion_signal_and_its_map_points_at_the_lesion():
    maps, masks = _planted()
    scorer = fit_lesion_scorer(maps, lesion_cover(masks, (GRID, GRID)), l2=1e-3)
    assert scorer.weight.abs().argmax() == 0
    assert all(pointing_hits(cell_scores(scorer, maps), masks))
    assert pointing_hits(-cell_scores(scorer, maps), masks).count(True) == 0


def test_attention_pools_the_cells_the_scores_favour():
    maps = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    scores = torch.full((2, 2, 2), -30.0)
    scores[0, 1, 0] = scores[1, 0, 1] = 30.0
    pooled = attention_pool(maps, scores)
    torch.testing.assert_close(pooled, torch.stack([maps[0, :, 1, 0], maps[1, :, 0, 1]]), atol=1e-4, rtol=0)
    even = attention_pool(maps, torch.zeros(2, 2, 2))
    torch.testing.assert_close(even, maps.mean(dim=(2, 3)))


def test_inner_folds_keep_each_group_together():
    groups = np.array(["a", "b", "a", "c", "b", "d", "e", "e"])
    folds = inner_folds(groups, k=3, seed=0)
    for group in np.unique(groups):
        assert len(set(folds[groups == group])) == 1
    assert set(folds) <= {0, 1, 2}


def test_cross_fitting_scores_each_image_with_a_scorer_that_never_saw_its_group(monkeypatch):
    maps, masks = _planted(n=16)
    groups = np.repeat(np.array(["g0", "g1", "g2", "g3", "g4", "g5", "g6", "g7"]), 2)
    fitted_on: list[set[float]] = []
    fit = attention_probe.fit_lesion_scorer

    def recording_fit(train_maps, cover, l2):
        fitted_on.append({float(v) for v in train_maps[:, 1, 0, 0]})  # each image's fingerprint
        return fit(train_maps, cover, l2)

    monkeypatch.setattr(attention_probe, "fit_lesion_scorer", recording_fit)
    cross_fitted_scores(maps, lesion_cover(masks, (GRID, GRID)), groups, l2=1e-3, k=4, seed=0)
    inner = inner_folds(groups, 4, 0)
    assert len(fitted_on) == len(np.unique(inner))
    for seen, fold in zip(fitted_on, np.unique(inner)):
        held = {float(v) for v in maps[inner == fold, 1, 0, 0]}
        assert seen.isdisjoint(held) and seen  # fitted on the other inner folds only


def _scores(accuracies: list[float]) -> list[dict[str, float | None]]:
    return [{"accuracy": a, "balanced_accuracy": a, "auc_malignant_vs_benign": None} for a in accuracies]


def test_table_compares_every_pooling_with_mean_pooling_fold_by_fold():
    scores = {"mean": _scores([0.8, 0.7]), "attention": _scores([0.9, 0.6]), "mean+attention": _scores([0.9, 0.8])}
    lines = report_table(scores, [0.5, 0.7]).splitlines()
    assert lines[2].startswith("| mean | 0.750 ± 0.071 |") and "| 0.000 ± 0.000 | 0/2 |" in lines[2]
    assert "| 0.000 ± 0.141 | 1/2 | 0.900 | 0.600 |" in lines[3]
    assert "| 0.100 ± 0.000 | 2/2 | 0.900 | 0.800 |" in lines[4]
    assert "pointing game on the held-out lesion images: 0.600 ± 0.141" in lines[-1]


@needs_busi
def test_attention_probe_runs_on_a_busi_subset(tmp_path):
    out, cache = tmp_path / "attention.md", tmp_path / "cache"
    args = ["--data", str(DEFAULT_DATA_DIR), "--subset", "12", "--k", "2", "--size", "64"]
    assert main([*args, "--members", "tf_efficientnet_lite0", "--out", str(out), "--cache", str(cache)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| mean") or line.startswith("| att")]
    assert [row.split(" | ")[0] for row in rows] == ["| mean", "| attention", "| mean+attention"]
    accuracies = [float(cell) for row in rows for cell in row.strip("| ").split(" | ")[-2:]]
    assert all(0.0 <= a <= 1.0 for a in accuracies)
    (cached,) = cache.glob("*_maps.pt")
    written = cached.stat().st_mtime_ns
    first = out.read_text().split("\n\n", 3)[-1]
    assert main([*args, "--members", "tf_efficientnet_lite0", "--out", str(out), "--cache", str(cache)]) == 0
    assert cached.stat().st_mtime_ns == written  # the maps are read back, not extracted again
    assert out.read_text().split("\n\n", 3)[-1] == first  # and the folds score the same


@pytest.mark.parametrize("bad", [["--k", "x"], ["--size"]])
def test_bad_arguments_are_refused(bad):
    with pytest.raises(SystemExit):
        main(bad)
