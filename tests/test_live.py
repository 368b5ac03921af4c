"""The live path: backend choice, identical heat-maps across backends, the whole frame to JPEG."""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np
import onnx
import pytest
import torch

from kdcore import cam_predictor as live
from kdcore.app.live_session import LiveSession, RegionOfInterest
from kdcore.cam_predictor import load_cam_predictor
from kdcore.models import build_model
from kdcore.onnx_runtime import export_onnx, onnx_paths
from kdcore.overlay import encode_jpeg


@pytest.fixture(scope="module")
def reference_cam(tiny_checkpoints):
    return load_cam_predictor(tiny_checkpoints["student"], backend="pytorch-grad-cam")


def test_student_gets_onnxruntime_and_teacher_the_reference(tiny_checkpoints):
    assert load_cam_predictor(tiny_checkpoints["student"]).backend == "onnxruntime"
    assert load_cam_predictor(tiny_checkpoints["teacher"]).backend == "pytorch-grad-cam"
    with pytest.raises(ValueError, match="pytorch-grad-cam"):
        load_cam_predictor(tiny_checkpoints["teacher"], backend="onnxruntime")


@pytest.mark.parametrize("backend", ["onnxruntime", "pytorch"])
def test_fast_backends_match_pytorch_grad_cam(tiny_checkpoints, reference_cam, speckle_image, backend):
    cam_predictor = load_cam_predictor(tiny_checkpoints["student"], backend=backend)
    prediction, heatmap = cam_predictor.predict_with_cam(speckle_image)
    expected_prediction, expected = reference_cam.predict_with_cam(speckle_image)
    assert cam_predictor.backend == backend and cam_predictor.class_names == reference_cam.class_names
    assert heatmap.shape == expected.shape == (224, 224) and heatmap.dtype == np.float32
    assert np.abs(heatmap - expected).max() <= 1e-3
    assert prediction.label == expected_prediction.label
    assert prediction.probabilities == pytest.approx(expected_prediction.probabilities, abs=1e-5)


def test_stale_onnx_next_to_the_checkpoint_is_not_used(tiny_checkpoints, reference_cam, speckle_image, tmp_path):
    student = tiny_checkpoints["student"]
    stale = tmp_path / student.name
    for src, dst in ((student, stale), (student.with_suffix(".json"), stale.with_suffix(".json"))):
        dst.write_bytes(src.read_bytes())
    meta = reference_cam.predictor.meta
    torch.manual_seed(123)
    other_weights = build_model(meta.model).eval()
    onnx.save(export_onnx(other_weights, replace(meta, weights_sha256="other")), onnx_paths(stale)[0])
    with pytest.warns(UserWarning, match="other weights"):
        cam_predictor = load_cam_predictor(stale)
    _, heatmap = cam_predictor.predict_with_cam(speckle_image)
    assert np.abs(heatmap - reference_cam.predict_with_cam(speckle_image)[1]).max() <= 1e-3


def test_live_frame_becomes_a_jpeg_of_the_frame_size_plus_status_bar(tiny_checkpoints, speckle_image):
    frame = cv2.cvtColor(cv2.resize(speckle_image, (640, 480)), cv2.COLOR_GRAY2BGR)
    result = LiveSession().process(load_cam_predictor(tiny_checkpoints["student"]), frame, RegionOfInterest(), 0.6, 0.4)
    decoded = cv2.imdecode(np.frombuffer(encode_jpeg(result.frame_bgr), np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (480 + 28, 640, 3)
    assert result.label in ("benign", "malignant", "normal")


def test_without_onnxruntime_the_student_gets_the_pytorch_forward_cam(tiny_checkpoints, monkeypatch):
    monkeypatch.setattr(live, "_has_onnxruntime", lambda: False)
    assert load_cam_predictor(tiny_checkpoints["student"]).backend == "pytorch"
