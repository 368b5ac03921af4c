"""Upload boxes: only their ``upload`` event reads them, and clearing one empties what it showed
without reading it. Gradio 5 refuses, with a "Waiting for file(s) to finish uploading" toast,
any event whose input box is uploading, and a ✕ followed at once by a new drop started that
upload before the clear (or change) event ran (tests/test_browser_tabs.py shows it in Chromium)."""

from __future__ import annotations

import pytest

from kdcore.app import handlers
from kdcore.app.layout import AppSettings, build_demo


@pytest.fixture(scope="module")
def config(tiny_checkpoints):
    return build_demo(AppSettings(checkpoints=tiny_checkpoints["student"].parent)).get_config_file()


def _box_id(config, elem_id: str) -> int:
    return next(c["id"] for c in config["components"] if c["props"].get("elem_id") == elem_id)


def _events_of(config, elem_id: str) -> dict[str, dict]:
    """The box's own events (upload, clear, ...) and the dependency each triggers."""
    box = _box_id(config, elem_id)
    return {event: dep for dep in config["dependencies"] for target, event in dep["targets"] if target == box}


@pytest.mark.parametrize("elem_id", ["image-file", "image-paste", "video-file"])
def test_a_box_is_read_on_upload_and_cleared_without_being_read(config, elem_id):
    events = _events_of(config, elem_id)
    assert set(events) == {"upload", "clear"}  # no change event: it also fires while a file uploads
    assert _box_id(config, elem_id) in events["upload"]["inputs"]
    assert events["clear"]["inputs"] == []


@pytest.mark.parametrize(
    ("elem_id", "analysis_api", "empty"),
    [
        ("image-file", "predict_page", handlers.empty_page),
        ("image-paste", "predict_image_page", handlers.empty_page),
        ("video-file", "analyse_video", handlers.empty_clip_review),
    ],
)
def test_clearing_a_box_empties_every_result_its_analysis_shows(config, elem_id, analysis_api, empty):
    analysis = next(dep for dep in config["dependencies"] if dep.get("api_name") == analysis_api)
    cleared = _events_of(config, elem_id)["clear"]
    assert cleared["outputs"] == analysis["outputs"]
    assert len(empty()) == len(cleared["outputs"]) and all(value is None or value == "" for value in empty())


def test_an_empty_image_page_is_what_no_image_gives():
    assert handlers.empty_page() == handlers.page_prediction(None, None, 0.4)
