"""ONNX export (logits + CAM), INT8 quantisation and the onnxruntime predictor."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from kdcore.export import export_checkpoint
from kdcore.inference import Prediction, Predictor, load_predictor
from kdcore.onnx_runtime import load_onnx_predictor, onnx_session, onnx_weights_sha256
from kdcore.transforms import Preprocess


def speckle_images(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.clip(rng.rayleigh(40 + 10 * i, (240 + 8 * i, 320)), 0, 255).astype(np.uint8) for i in range(count)]


@pytest.fixture(scope="module")
def exported(tiny_checkpoints, tmp_path_factory) -> dict:
    out_dir = tmp_path_factory.mktemp("onnx")
    return export_checkpoint(tiny_checkpoints["student"], speckle_images(8), out_dir=out_dir)


def test_fp32_graph_matches_pytorch(exported):
    assert exported["max_abs_diff_fp32"]["logits"] < 1e-4
    assert exported["max_abs_diff_fp32"]["cam"] < 1e-4


def test_graph_records_the_weights_it_was_exported_from(exported, tiny_checkpoints):
    meta = load_predictor(tiny_checkpoints["student"]).meta
    assert onnx_weights_sha256(exported["onnx"]) == meta.weights_sha256
    onnx.checker.check_model(onnx.load(exported["int8_onnx"]))


def test_int8_graph_runs_and_is_smaller(exported, tiny_checkpoints):
    assert exported["int8_onnx_mb"] <= 2.0 < exported["onnx_mb"]
    meta = load_predictor(tiny_checkpoints["student"]).meta
    small = Preprocess(meta.preprocess).resize(speckle_images(1, seed=1)[0]).unsqueeze(0).numpy()
    logits, cam = onnx_session(exported["int8_onnx"]).run(None, {"image": small})
    assert logits.shape == (1, 3) and cam.shape == (1, 224, 224)
    assert np.isfinite(logits).all() and 0.0 <= cam.min() and cam.max() <= 1.0


def test_onnx_predictor_has_the_pytorch_interface_and_outputs(exported, tiny_checkpoints):
    reference = load_predictor(tiny_checkpoints["student"])
    onnx_predictor = load_onnx_predictor(tiny_checkpoints["student"], exported["onnx"])
    assert isinstance(onnx_predictor, Predictor)
    assert onnx_predictor.class_names == reference.class_names
    greys = speckle_images(5, seed=2)
    prediction = onnx_predictor.predict(greys[0])
    expected = reference.predict(greys[0])
    assert isinstance(prediction, Prediction) and prediction.label == expected.label
    assert prediction.probabilities == pytest.approx(expected.probabilities, abs=1e-5)
    torch.testing.assert_close(onnx_predictor.logits_for(greys, batch_size=2), reference.logits_for(greys))
