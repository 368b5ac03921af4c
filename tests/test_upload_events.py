"""Upload boxes: only their ``upload`` event reads them, and clearing one empties what it showed
without reading it. Gradio 5 refuses, with a "Waiting for file(s) to finish uploading" toast,
any event whose input box is uploading, and a ✕ followed at once by a new drop started that
upload before the clear (or change) event ran. A box's events run one at a time in the order
sent, and a clear arriving after a new file changes nothing: Gradio sends a second, late clear
(tests/test_browser_tabs.py shows both in Chromium)."""

from __future__ import annotations

import gradio as gr
import pytest

from kdcore.app import handlers
from kdcore.app.layout import BOX_STILL_EMPTY_JS, AppSettings, build_demo


@pytest.fixture(scope="module")
def demo(tiny_checkpoints):
    return build_demo(AppSettings(checkpoints=tiny_checkpoints["student"].parent))


@pytest.fixture(scope="module")
def config(demo):
    return demo.get_config_file()


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
    box = _box_id(config, elem_id)
    assert box in events["upload"]["inputs"]
    assert box not in events["clear"]["inputs"]
    assert events["clear"]["js"] == BOX_STILL_EMPTY_JS and events["clear"]["outputs"][0] == box


@pytest.mark.parametrize("elem_id", ["image-file", "image-paste", "video-file"])
def test_a_boxs_events_share_one_queue_of_one_worker(demo, config, elem_id):
    events = _events_of(config, elem_id)
    example_clicks = [dep for dep in config["dependencies"] if dep["trigger_after"] is not None]
    ids = [dep["id"] for dep in events.values()]
    ids += [dep["id"] for dep in example_clicks if _box_id(config, elem_id) in dep["inputs"]]
    assert {(demo.fns[i].concurrency_id, demo.fns[i].concurrency_limit) for i in ids} == {(elem_id, 1)}


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
    assert cleared["outputs"] == [_box_id(config, elem_id), *analysis["outputs"]]
    assert len(empty()) == len(analysis["outputs"]) and all(value is None or value == "" for value in empty())


def test_an_empty_image_page_is_what_no_image_gives():
    assert handlers.empty_page() == handlers.page_prediction(None, None, 0.4)


def test_a_clear_empties_the_page_but_one_arriving_after_a_new_file_changes_nothing():
    skip = gr.skip()
    assert handlers.cleared(handlers.empty_page, still_empty=True) == (skip, *handlers.empty_page())
    assert handlers.cleared(handlers.empty_page, still_empty=False) == (skip,) * (1 + len(handlers.empty_page()))
