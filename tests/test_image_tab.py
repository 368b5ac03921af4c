"""Image tab, second round: a refused file leaves its reason in the panel (the API still raises),
and a refusal is one log line, not a traceback."""

from __future__ import annotations

import logging

import gradio as gr
import pytest

from kdcore.app import handlers
from kdcore.app.service import load_models


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
    return load_models(tiny_checkpoints["student"].parent)


def test_refused_file_leaves_its_reason_in_the_panel(models, tmp_path, caplog):
    bad = tmp_path / "scan.png"
    bad.write_bytes(b"this is not a png")
    with caplog.at_level(logging.INFO, logger="kdcore.app.handlers"):
        payload, teacher, student, state, *texts = handlers.page_prediction(models, str(bad), 0.4)
    assert "scan.png" in payload["error"] and teacher is None and student is None and state is None
    marker = texts[-1]
    assert marker.startswith("### ❌ Not analysed") and "scan.png" in marker
    assert [r.getMessage() for r in caplog.records] == [f"refused input: {payload['error']}"]
    with pytest.raises(gr.Error) as error:  # the API endpoint raises, without a printed traceback
        handlers.predict(models, str(bad), 0.4)
    assert error.value.print_exception is False and error.value.message == payload["error"]


def test_readable_file_fills_the_panel(models, speckle_image, tmp_path):
    import cv2

    path = tmp_path / "ok.png"
    cv2.imwrite(str(path), speckle_image)
    payload, teacher, student, analysis, *texts = handlers.page_prediction(models, str(path), 0.4)
    assert set(payload) == {"teacher", "student"} and teacher.shape == student.shape
    assert texts[0].startswith("**Teacher**") and ("agree" in texts[-1] or "Disagreement" in texts[-1])
    assert analysis.predictions["student"].label in payload["student"]["label"]


def test_low_confidence_is_flagged_and_probabilities_are_called_calibrated():
    from kdcore.app.service import prediction_markdown
    from kdcore.inference import Prediction

    unsure = Prediction("benign", {"benign": 0.44, "malignant": 0.36, "normal": 0.20}, 3.0)
    sure = Prediction("benign", {"benign": 0.95, "malignant": 0.03, "normal": 0.02}, 3.0)
    assert "low confidence" in prediction_markdown("student", unsure)
    line = prediction_markdown("student", sure, total_ms=41.0)
    assert "low confidence" not in line and "calibrated" in line
    assert "forward pass 3.0 ms, with Grad-CAM 41 ms" in line


def test_api_page_lists_only_what_users_call(tiny_checkpoints):
    from app_helpers import launch

    from kdcore.app.layout import PUBLIC_API

    demo = launch(tiny_checkpoints["student"].parent)
    try:
        documented = set(demo.get_api_info()["named_endpoints"])
        everything = set(demo.get_api_info(all_endpoints=True)["named_endpoints"])
    finally:
        demo.close()
    assert documented == {f"/{name}" for name in PUBLIC_API}
    assert any("set_input" in name for name in everything - documented)  # FastRTC's, still there


@pytest.mark.parametrize("report_format", ["pdf", "png"])
def test_case_report_holds_the_analysis(models, speckle_image, tmp_path, report_format):
    import cv2

    from kdcore.app.service import analyse_image

    path = tmp_path / "case 7.png"
    cv2.imwrite(str(path), speckle_image)
    report = handlers.case_report_for_file(models, str(path), 0.4, report_format)
    data = open(report, "rb").read()
    assert data.startswith(b"%PDF" if report_format == "pdf" else b"\x89PNG") and len(data) > 20_000
    assert report.endswith(f"case_report_case_7.{report_format}")
    student = models.metas["student"]
    assert student.weights_sha256[:16].encode() in data  # the record is in the file's metadata
    assert b"verdict rule: the most probable class" in data and b"not a diagnostic device" in data
    analysis = analyse_image(models, speckle_image)
    on_screen = handlers.case_report(models, analysis, 0.4, report_format)
    assert open(on_screen, "rb").read()[:4] == data[:4]
    with pytest.raises(gr.Error, match="Analyse an image first"):
        handlers.case_report(models, None, 0.4, report_format)
    with pytest.raises(gr.Error, match="report format"):
        handlers.case_report_for_file(models, str(path), 0.4, "docx")


def test_panels_say_which_class_they_explain_and_show_the_colour_scale(models, speckle_image):
    import re

    import cv2
    import numpy as np

    from kdcore.app.service import analyse_image
    from kdcore.overlay import colour_scale_html

    analysis = analyse_image(models, speckle_image)
    teacher_line, student_line = handlers.summary_values(analysis)[:2]
    for line, role in ((teacher_line, "teacher"), (student_line, "student")):
        assert f"Grad-CAM: evidence for **{analysis.predictions[role].label}** (predicted)" in line
    stops = [tuple(map(int, m)) for m in re.findall(r"rgb\((\d+),(\d+),(\d+)\)", colour_scale_html())]
    jet = cv2.applyColorMap(np.array([[0], [255]], np.uint8), cv2.COLORMAP_JET)[:, 0, ::-1]
    assert stops[0] == tuple(jet[0]) and stops[-1] == tuple(jet[1])  # the overlay's own colour map


def test_grad_cam_can_explain_any_class_for_both_models(models, speckle_image):
    import numpy as np

    from kdcore.app.service import analyse_image, heatmap_bytes
    from kdcore.cam import grad_cam

    analysis = analyse_image(models, speckle_image)
    overlays_state_texts = handlers.explain(models, analysis, "malignant", 0.4)
    chosen = overlays_state_texts[2]
    assert chosen.explained == "malignant" and chosen.predictions == analysis.predictions
    for role, predictor in models.predictors.items():
        _, reference = grad_cam(predictor, analysis.model_inputs[role], predictor.class_names.index("malignant"))
        np.testing.assert_array_equal(chosen.heatmaps[role], heatmap_bytes(reference))
    assert "Grad-CAM: evidence for **malignant** (chosen)" in overlays_state_texts[3]
    back = handlers.explain(models, chosen, handlers.EXPLAIN_PREDICTED, 0.4)[2]
    for role in models.cams:  # the predicted class again: the original heat-maps, within rounding
        assert np.abs(back.heatmaps[role].astype(int) - analysis.heatmaps[role].astype(int)).max() <= 1
    assert handlers.explain(models, None, "benign", 0.4)[:3] == [None, None, None]
