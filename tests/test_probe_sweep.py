"""The probe-feature sweep: its features are what the shipped teacher pools, the table compares
every row with the shipped recipe fold by fold, and the command runs end to end on BUSI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import needs_busi

from kdcore.config import DEFAULT_DATA_DIR, ModelConfig, PreprocessConfig
from kdcore.experiment.probe_sweep import SHIPPED, FeatureSet, main, pooled_maps, sweep_table
from kdcore.models import FeatureEnsemble
from kdcore.probe import pooled_features
from kdcore.transforms import Preprocess

SIZE = 64


@pytest.fixture(scope="module")
def lite0_ensemble() -> FeatureEnsemble:
    torch.manual_seed(0)
    cfg = ModelConfig(kind="ensemble", cnn_name="tf_efficientnet_lite0", cnn_init="none", flip_average=True)
    return FeatureEnsemble(cfg, SIZE).eval()


def _images(n: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, SIZE, SIZE), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


def test_head_mean_features_are_what_the_shipped_ensemble_pools(lite0_ensemble):
    images = _images()
    unit = Preprocess(PreprocessConfig(input_size=SIZE, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)))
    expected = pooled_features(lite0_ensemble, images, unit).numpy()
    maps = pooled_maps(lite0_ensemble.members[0], images)
    np.testing.assert_allclose(maps["head/mean"], expected, rtol=1e-4, atol=1e-5)
    assert set(maps) == {f"{tap}/{pool}" for tap in ("block4", "block5", "block6", "head") for pool in ("mean", "max")}


def test_every_tap_is_mirror_invariant_and_hooks_are_removed(lite0_ensemble):
    backbone = lite0_ensemble.members[0]
    images = _images()
    plain, mirrored = pooled_maps(backbone, images), pooled_maps(backbone, images.flip(3))
    for key in plain:
        np.testing.assert_allclose(plain[key], mirrored[key], rtol=1e-4, atol=1e-5, err_msg=key)
    assert all(not block._forward_hooks for block in backbone.blocks)


def _scores(accuracies: list[float]) -> list[dict[str, float | None]]:
    return [{"accuracy": a, "balanced_accuracy": a, "auc_malignant_vs_benign": None} for a in accuracies]


def test_table_gives_each_rows_fold_by_fold_difference_to_the_shipped_recipe():
    (shipped, shipped_c), other = SHIPPED, FeatureSet(("tf_efficientnet_lite2",), 320, ("head",), ("mean",))
    rows = [(shipped, shipped_c, 2560, _scores([0.8, 0.7, 0.9])), (other, 0.1, 1280, _scores([0.9, 0.7, 0.8]))]
    lines = sweep_table(rows).splitlines()
    assert lines[2].startswith("| lite0+lite2 260px head mean | 0.01 | 2560 | 0.800 ± 0.100 |")
    assert "| 0.000 ± 0.000 |" in lines[2]
    assert lines[3].startswith("| lite2 320px head mean | 0.1 | 1280 | 0.800 ± 0.100 |")
    assert "| 0.000 ± 0.100 | 0.900 | 0.700 | 0.800 |" in lines[3]  # differences +0.1, 0, -0.1
    assert "| — |" in lines[3]  # no AUC on these folds


def test_unknown_tap_is_refused(capsys):
    assert main(["--taps", "head+block9"]) == 2
    assert "block9" in capsys.readouterr().err


@needs_busi
def test_sweep_runs_on_a_busi_subset(tmp_path):
    out = tmp_path / "sweep.md"
    args = ["--data", str(DEFAULT_DATA_DIR), "--subset", "12", "--k", "2", "--sizes", str(SIZE), "--cs", "0.01", "1"]
    args += ["--members", "tf_efficientnet_lite0", "--taps", "head", "block5+head", "--pooling", "mean"]
    assert main([*args, "--out", str(out), "--cache", str(tmp_path / "cache")]) == 0
    table = [line for line in out.read_text().splitlines() if line.startswith("| lite0")]
    assert [line.split(" | ")[:3] for line in table] == [
        ["| lite0 64px head mean", "0.01", "1280"], ["| lite0 64px head mean", "1", "1280"],
        ["| lite0 64px block5+head mean", "0.01", "1472"], ["| lite0 64px block5+head mean", "1", "1472"],
    ]  # fmt: skip
    accuracies = [float(cell) for line in table for cell in line.strip("| ").split(" | ")[-2:]]
    assert all(0.0 <= a <= 1.0 for a in accuracies)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1  # one network at one size, extracted once
