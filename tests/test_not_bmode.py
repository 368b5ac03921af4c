"""Every tab warns when the input does not look like a B-mode ultrasound image (it is in colour,
like Chromium's fake camera or a photo); grey scans pass without a warning."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from kdcore.app import handlers
from kdcore.app.batch import BatchItem, analyse_item
from kdcore.app.live_session import LiveSession, RegionOfInterest
from kdcore.app.service import load_models
from kdcore.app.video import clip_summary_markdown, probe_clip
from kdcore.imaging import colour_share, file_colour_share, not_bmode_warning

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def _colourful(height: int = 240, width: int = 320) -> np.ndarray:
    """A test-card like picture: saturated colour bars (BGR)."""
    bars = np.array([[0, 0, 255], [0, 255, 0], [255, 0, 0], [0, 255, 255], [255, 255, 255]], np.uint8)
    return np.repeat(bars[np.arange(width) * len(bars) // width][None], height, axis=0)


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
    return load_models(tiny_checkpoints["student"].parent)


def test_colour_share_is_zero_for_grey_and_high_for_colour_bars(tmp_path):
    grey = cv2.imread(str(ASSETS / "phantom_round_lesion.png"))
    assert colour_share(grey) == 0.0 and colour_share(grey[..., 0]) == 0.0
    assert colour_share(_colourful()) > 0.7
    cv2.imwrite(str(tmp_path / "bars.png"), _colourful())
    assert file_colour_share(ASSETS / "phantom_round_lesion.png") == 0.0
    assert file_colour_share(tmp_path / "bars.png") > 0.7
    assert file_colour_share(tmp_path / "missing.png") == 0.0
    assert not_bmode_warning(0.11) == "" and "does not look like a B-mode" in not_bmode_warning(0.5)  # BrEaST: <= 11 %


def test_image_tab_and_batch_warn_on_a_colour_picture(models, tmp_path):
    cv2.imwrite(str(tmp_path / "photo.png"), _colourful())
    *_, marker = handlers.page_prediction(models, str(tmp_path / "photo.png"), 0.4)
    assert "does not look like a B-mode ultrasound image" in marker
    *_, grey_marker = handlers.page_prediction(models, str(ASSETS / "phantom_round_lesion.png"), 0.4)
    assert "B-mode" not in grey_marker
    row, _ = analyse_item(models, BatchItem("photo.png", tmp_path / "photo.png", None))
    assert "in colour: not B-mode?" in row["flags"]


def test_live_frames_in_colour_are_flagged(models):
    session = LiveSession()
    coloured = session.process(models.student_cam, _colourful(480, 640), RegionOfInterest(), 0.0, 0.4)
    assert "NOT B-MODE?" in coloured.status_text() and "B-mode" in coloured.status_markdown()
    grey = cv2.cvtColor(cv2.imread(str(ASSETS / "phantom_round_lesion.png")), cv2.COLOR_BGR2GRAY)
    plain = session.process(models.student_cam, cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR), RegionOfInterest(), 0.0, 0.4)
    assert "B-MODE" not in plain.status_text() and "B-mode" not in plain.status_markdown()


def test_colour_clip_is_flagged_in_preview_and_summary(tmp_path):
    path = tmp_path / "camera.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (320, 240))
    for _ in range(5):
        writer.write(_colourful())
    writer.release()
    info = probe_clip(path)
    assert info.colour_share > 0.5
    _, note = handlers.clip_preview(str(path))
    assert "does not look like a B-mode" in note
    assert probe_clip(ASSETS / "phantom_sweep.mp4").colour_share < 0.05
    from kdcore.app.video import FrameResult

    results = [FrameResult(0, 0.0, "benign", {"benign": 0.8, "malignant": 0.1, "normal": 0.1}, 3.0)]
    assert "B-mode" in clip_summary_markdown(results, info, 1.0).splitlines()[1]
