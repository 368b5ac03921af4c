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
