"""Handler-level tests of the clinician app: model loading, image analysis, live session, video."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from tiny_models import TINY_ENSEMBLE

from kdcore.app.about import about_markdown
from kdcore.app.live_session import (
    STATUS_BAR_HEIGHT,
    FrameRateMeter,
    LiveSession,
    RegionOfInterest,
    RunningMean,
)
from kdcore.app.phantom import EXAMPLE_PHANTOMS, speckle_phantom
from kdcore.app.service import ImageAnalysis, analyse_image, explain_class, load_models
from kdcore.app.video import (
    VideoReadError,
    analyse_clip,
    clip_summary_markdown,
    probe_clip,
    timeline_table,
)
from kdcore.cam_predictor import load_cam_predictor
from kdcore.checkpoint import CheckpointMeta, save_checkpoint
from kdcore.config import CLASS_NAMES, OFFLINE
from kdcore.models import build_model
from kdcore.operating_point import verdict_rule
from kdcore.overlay import encode_jpeg

ASSETS = Path(__file__).resolve().parent.parent / "assets"


@pytest.fixture(scope="module")
def checkpoint_dir(tiny_checkpoints) -> Path:
    return tiny_checkpoints["student"].parent


@pytest.fixture(scope="module")
def models(checkpoint_dir):
    return load_models(checkpoint_dir)


@pytest.fixture(scope="module")
def cam_predictor(tiny_checkpoints):
    return load_cam_predictor(tiny_checkpoints["student"])


def test_load_models_reports_missing_and_broken_without_server_paths(tmp_path, tiny_checkpoints):
    for suffix in (".safetensors", ".json"):
        shutil.copy(tiny_checkpoints["student"].with_suffix(suffix), tmp_path / f"student{suffix}")
    (tmp_path / "student.safetensors").write_bytes(b"not weights")
    models = load_models(tmp_path)
    assert models.cams == {} and models.student_cam is None
    assert any(p.startswith("teacher:") and "not found" in p for p in models.problems)
    assert any(p.startswith("student:") and "broken" in p for p in models.problems)
    assert str(tmp_path) not in models.status_markdown
    assert "python train.py all" in models.status_markdown
    assert "not loaded" in about_markdown(models)


def test_load_models_all_present(models):
    assert set(models.cams) == {"teacher", "student"}
    assert models.problems == [] and models.status_markdown == ""
    assert "Research demo" in about_markdown(models)


def test_app_serves_a_flip_averaged_feature_ensemble_teacher(tmp_path, tiny_checkpoints, speckle_image):
    """The offline preset ships an ensemble teacher: the app loads it, names it, and explains any class."""
    torch.manual_seed(0)
    cfg = replace(TINY_ENSEMBLE, flip_average=True)
    preprocess = replace(OFFLINE.teacher_preprocess, input_size=96)
    save_checkpoint(tmp_path / "teacher", build_model(cfg, 96).eval(), CheckpointMeta(cfg, preprocess, CLASS_NAMES))
    for suffix in (".safetensors", ".json"):
        shutil.copy(tiny_checkpoints["student"].with_suffix(suffix), tmp_path / f"student{suffix}")
    models = load_models(tmp_path)
    assert models.problems == [] and set(models.cams) == {"teacher", "student"}
    assert "ensemble of mobilenetv3_small_050 + mobilenetv3_small_075" in about_markdown(models)

    analysis = analyse_image(models, speckle_image)
    assert sum(analysis.predictions["teacher"].probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    heatmaps = [explain_class(models, analysis, name).heatmaps["teacher"] for name in CLASS_NAMES]
    assert all(h.shape == analysis.heatmaps["teacher"].shape for h in heatmaps)
    assert any(not np.array_equal(heatmaps[0], h) for h in heatmaps[1:])  # each class gets its own map


def test_analyse_image_json_shape_and_overlays(models, speckle_image):
    analysis = analyse_image(models, speckle_image)
    payload = analysis.as_json()
    assert set(payload) == {"teacher", "student"}
    for result in payload.values():
        assert set(result) == {"label", "probabilities", "latency_ms", "verdict_rule"}
        assert result["label"] in CLASS_NAMES
        assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert result["latency_ms"] > 0
    plain, blended = analysis.overlay("student", 0.0), analysis.overlay("student", 0.8)
    assert plain.shape == (*speckle_image.shape, 3)
    np.testing.assert_array_equal(plain[..., 0], speckle_image)  # opacity 0 = the image itself
    assert np.abs(blended.astype(int) - plain).mean() > 10


def test_concurrent_grad_cams_match_serial_and_release_hooks(models, speckle_image):
    from concurrent.futures import ThreadPoolExecutor

    from kdcore.cam import grad_cam

    predictor = models.cams["teacher"].predictor
    images = [np.roll(speckle_image, shift, axis=1) for shift in (0, 60, 120, 180)]
    serial = [grad_cam(predictor, image) for image in images]
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(lambda image: grad_cam(predictor, image), images))
    for (prediction, heatmap), (other_prediction, other_heatmap) in zip(serial, parallel):
        assert prediction.probabilities == pytest.approx(other_prediction.probabilities, abs=1e-6)
        np.testing.assert_allclose(heatmap, other_heatmap, atol=1e-5)
    hooked = [m for m in predictor.model.modules() if m._forward_hooks or m._backward_hooks]
    assert not hooked, "Grad-CAM hooks were left on the model"


def _prediction(label: str):
    from kdcore.inference import Prediction

    return Prediction(label, {name: float(name == label) for name in CLASS_NAMES}, 1.0)


def test_agreement_marker():
    grey = np.zeros((32, 32), np.uint8)
    agree = ImageAnalysis(grey, {"teacher": _prediction("benign"), "student": _prediction("benign")}, {})
    differ = ImageAnalysis(grey, {"teacher": _prediction("benign"), "student": _prediction("normal")}, {})
    assert "agree" in agree.agreement_markdown() and "Disagreement" not in agree.agreement_markdown()
    assert "Disagreement" in differ.agreement_markdown()


def test_region_of_interest_box():
    assert RegionOfInterest().box(480, 640) == (0, 480, 0, 640)
    assert RegionOfInterest(left=10, top=25, right=10, bottom=25).box(480, 640) == (120, 360, 64, 576)
    y0, y1, x0, x1 = RegionOfInterest(left=45, right=45, top=45, bottom=45).box(10, 10)
    assert y1 > y0 and x1 > x0


def test_probability_smoother_moves_towards_new_values():
    smoother = RunningMean()
    first = smoother.update(np.array([1.0, 0.0, 0.0]), weight=0.6)
    np.testing.assert_allclose(first, [1, 0, 0])
    np.testing.assert_allclose(smoother.update(np.array([0.0, 1.0, 0.0]), 0.6), [0.6, 0.4, 0.0])
    np.testing.assert_allclose(smoother.update(np.array([0.0, 0.0, 1.0]), 0.0), [0, 0, 1])


def test_frame_rate_meter_measures_interval():
    meter = FrameRateMeter()
    fps = [meter.tick(i / 30) for i in range(60)]
    assert fps[0] == 0.0 and fps[-1] == pytest.approx(30.0, rel=1e-3)


def test_live_session_annotates_frame_and_remembers_roi(cam_predictor):
    frame = cv2.cvtColor(speckle_phantom(480, 640, EXAMPLE_PHANTOMS["phantom_round_lesion"]), cv2.COLOR_GRAY2BGR)
    session = LiveSession()
    roi = RegionOfInterest(left=10, top=10, right=10, bottom=10)
    result = session.process(cam_predictor, frame, roi, smoothing=0.5, opacity=0.5)
    assert result.frame_bgr.shape == (480 + STATUS_BAR_HEIGHT, 640, 3)
    assert session.last_grey.shape == (384, 512)
    assert result.label in CLASS_NAMES and result.latency_ms > 0
    assert result.label in result.status_text() and "FPS" in result.status_text()
    # The side panel says how the label was decided (it can be malignant while benign is more probable).
    rule = verdict_rule(cam_predictor.predictor.meta.operating_point)
    assert result.rule == rule and f"Verdict rule: {rule}" in result.status_markdown()
    image_part = result.frame_bgr[STATUS_BAR_HEIGHT:]
    np.testing.assert_array_equal(image_part[:40], frame[:40])  # outside the ROI: untouched
    assert np.abs(image_part[100:300, 100:500].astype(int) - frame[100:300, 100:500]).mean() > 5
    assert encode_jpeg(result.frame_bgr)[:2] == b"\xff\xd8"
    assert session.panel_due(100.0) and not session.panel_due(100.01)


def test_probe_clip_rejects_bad_files(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.avi"
    garbage.write_bytes(b"this is not a video" * 100)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(VideoReadError, match="empty"):
        probe_clip(empty)
    with pytest.raises(VideoReadError, match="not a readable video"):
        probe_clip(garbage)
    with pytest.raises(VideoReadError, match="not a supported video"):
        probe_clip(text)


def test_analyse_clip_timeline_and_summary(cam_predictor):
    clip = ASSETS / "phantom_sweep.mp4"
    info = probe_clip(clip)
    assert info.fps == pytest.approx(10.0) and not info.capped
    frames = list(analyse_clip(cam_predictor, clip, info, opacity=0.4))
    assert len(frames) == info.total_frames == 20
    overlay, last = frames[-1]
    assert overlay.shape == (240, 320, 3) and last.time_s == pytest.approx(1.9)
    results = [r for _, r in frames]
    table = timeline_table(results)
    assert len(table) == 20 * len(CLASS_NAMES) and set(table["class"]) == set(CLASS_NAMES)
    summary = clip_summary_markdown(results, info, wall_seconds=1.0)
    assert "20 frames analysed" in summary and "Clip summary" in summary


def test_long_clip_is_capped(tmp_path, monkeypatch):
    import kdcore.app.video

    monkeypatch.setattr(kdcore.app.video, "MAX_CLIP_SECONDS", 1.0)
    info = probe_clip(ASSETS / "phantom_sweep.mp4")
    assert info.capped and info.frames_to_analyse == 10
    assert "first 1 s" in info.cap_message


def test_phantom_has_a_darker_lesion():
    with_lesion = speckle_phantom(lesion=EXAMPLE_PHANTOMS["phantom_round_lesion"], seed=1).astype(float)
    without = speckle_phantom(lesion=None, seed=1).astype(float)
    centre = (slice(160, 200), slice(220, 260))
    assert with_lesion[centre].mean() < 0.5 * without[centre].mean()
    np.testing.assert_array_equal(speckle_phantom(seed=3), speckle_phantom(seed=3))


def test_region_of_interest_preview_shows_what_the_crop_keeps(cam_predictor):
    from kdcore.app import handlers

    blank = handlers.roi_preview(LiveSession(), 10, 0, 0, 20)
    assert blank.shape == (240, 320, 3)
    session = LiveSession()
    frame = np.full((480, 640, 3), 200, np.uint8)
    session.process(cam_predictor, frame, RegionOfInterest(), 0.0, 0.4)
    shown = handlers.roi_preview(session, 25, 0, 0, 50)  # keep the right 3/4, the top half
    assert shown.shape == (480, 640, 3)
    assert shown[100, 400].tolist() == [200, 200, 200]  # kept: as it is
    assert shown[400, 100].tolist() == [66, 66, 66]  # cut: darkened
    assert tuple(shown[0, 300]) != (66, 66, 66)  # the box's top edge is drawn
