"""What a person sees in Chromium, second round: a refused file keeps its reason on the page,
replacing an image or a clip raises no "waiting for upload" toasts, and a clear answered late does
not blank the next file's result, the live preview is never mirrored,
the start button says what it does, Stop clears the live panel, the verdict rule with its
sensitivity / specificity sits next to the verdict, the video tab shows the first
frame at once and ends on a summary that names the most suspicious segment.

Run with ``pytest -m browser``; needs /usr/bin/chromium (scripts/install_browser.sh).
"""

from __future__ import annotations

import base64
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from app_helpers import launch
from playwright.sync_api import expect

from kdcore.app import handlers
from kdcore.checkpoint import CheckpointMeta, write_record
from kdcore.config import REPO_ROOT
from kdcore.operating_point import OperatingPoint
from scripts.live_browser import CHROMIUM, VIEWPORT, chromium_page, clip_frames, write_y4m

ASSETS = REPO_ROOT / "assets"
ARTIFACTS = REPO_ROOT / "test-artifacts"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="run scripts/install_browser.sh first"),
]

TOASTS_JS = "() => Array.from(document.querySelectorAll('.toast-body')).map(t => t.innerText)"
PERCENT_SHOWN_JS = "(id) => /\\d+%/.test(document.querySelector(id).innerText)"
VIDEO_TRANSFORM_JS = "() => getComputedStyle(document.querySelector('#live-stream video')).transform"


STUDENT_POINT = OperatingPoint(0.12, 0.9, 0.9, 0.571, 20, 56, "validation split")


def checkpoints_with_student_point(tiny_checkpoints, folder: Path) -> Path:
    """The tiny checkpoints, the student's record carrying an operating point."""
    for path in tiny_checkpoints.values():
        for suffix in (".safetensors", ".json"):
            shutil.copy(path.with_suffix(suffix), folder / path.with_suffix(suffix).name)
    student = folder / tiny_checkpoints["student"].name
    write_record(student, replace(CheckpointMeta.read(student), operating_point=STUDENT_POINT))
    return folder


@pytest.fixture(scope="module")
def page(tiny_checkpoints, tmp_path_factory):
    y4m = write_y4m(clip_frames(ASSETS / "phantom_sweep.mp4"), tmp_path_factory.mktemp("cam") / "cam.y4m")
    demo = launch(checkpoints_with_student_point(tiny_checkpoints, tmp_path_factory.mktemp("shipped")))
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        with chromium_page(y4m) as page:
            page.goto(demo.local_url)
            yield page
    finally:
        demo.close()


def _answered_late(handler: Callable, seconds: float) -> Callable:
    def late(*args):
        time.sleep(seconds)
        return handler(*args)

    return late


@pytest.fixture(scope="module")
def page_with_late_clears(page, tiny_checkpoints):
    """A second tab, on an app that answers a clear 1.5 s late, as a loaded machine can (CI did)."""
    with pytest.MonkeyPatch.context() as patch:  # only while the app is built: its clear events
        patch.setattr(handlers, "empty_page", _answered_late(handlers.empty_page, 1.5))
        patch.setattr(handlers, "empty_clip_review", _answered_late(handlers.empty_clip_review, 1.5))
        demo = launch(tiny_checkpoints["student"].parent)
    late = page.context.browser.new_page(viewport=VIEWPORT)
    try:
        late.goto(demo.local_url)
        yield late
    finally:
        late.close()
        demo.close()


def _seen_toasts(page, seconds: float) -> list[str]:
    seen: set[str] = set()
    deadline = time.time() + seconds
    while time.time() < deadline:
        seen.update(page.evaluate(TOASTS_JS))
        time.sleep(0.1)
    return sorted(seen)


def upload_image(page, path: Path) -> None:
    """Drop a file into the Image tab's box, clearing the one shown first (as a user would)."""
    box = page.locator("#image-file")
    if box.locator("input[type=file]").count() == 0:
        box.get_by_role("button", name="Clear").click()
        # the cleared page first: a wait for the next result must not pass on the last one's text
        expect(page.locator("#image-student-summary")).to_have_text("", timeout=30_000)
    box.locator("input[type=file]").set_input_files(str(path))


# Click the box's ✕ and drop a new file in the same moment: the new upload starts before the
# clear event has run (Playwright's two steps, click then set files, leave a gap that hid this).
CLEAR_AND_DROP_JS = """async ([box_id, name, type, base64]) => {
  const box = document.querySelector(box_id);
  box.querySelector('button[aria-label=Clear]').click();
  let input = box.querySelector('input[type=file]');
  while (!input) {
    await new Promise(resolve => setTimeout(resolve, 1));
    input = box.querySelector('input[type=file]');
  }
  const files = new DataTransfer();
  files.items.add(new File([Uint8Array.from(atob(base64), c => c.charCodeAt(0))], name, {type}));
  input.files = files.files;
  input.dispatchEvent(new Event('change', {bubbles: true}));
}"""


def clear_and_drop_at_once(page, box_id: str, path: Path, mime_type: str) -> None:
    page.evaluate(CLEAR_AND_DROP_JS, [box_id, path.name, mime_type, base64.b64encode(path.read_bytes()).decode()])


def _waiting_toasts(toasts: list[str]) -> list[str]:
    return [t for t in toasts if "Waiting for file" in t]


def _clip_preview_shown(page) -> None:
    page.locator("#video-status").filter(has_text="Press Analyse clip").wait_for(timeout=30_000)


def test_replacing_an_image_raises_no_waiting_toasts(page, tmp_path):
    page.get_by_role("tab", name="Image").click()
    upload_image(page, ASSETS / "phantom_round_lesion.png")
    page.wait_for_function(PERCENT_SHOWN_JS, arg="#image-student-summary")
    upload_image(page, ASSETS / "phantom_irregular_lesion.png")  # as a person does it, step by step
    toasts = _seen_toasts(page, 4.0)
    for _ in range(3):  # at once (failed every time while clearing read the box)
        clear_and_drop_at_once(page, "#image-file", ASSETS / "phantom_round_lesion.png", "image/png")
        toasts += _seen_toasts(page, 1.5)
    assert not _waiting_toasts(toasts), toasts
    page.locator("#image-teacher-overlay img").wait_for(timeout=60_000)


def test_replacing_a_clip_raises_no_waiting_toasts(page):
    page.get_by_role("tab", name="Video").click()
    page.locator("#video-file input[type=file]").set_input_files(str(ASSETS / "phantom_sweep.mp4"))
    _clip_preview_shown(page)
    toasts = []
    for _ in range(3):
        clear_and_drop_at_once(page, "#video-file", ASSETS / "phantom_sweep.mp4", "video/mp4")
        toasts += _seen_toasts(page, 1.5)
    assert not _waiting_toasts(toasts), toasts
    _clip_preview_shown(page)
    page.locator("#video-file").get_by_role("button", name="Clear").click()
    expect(page.locator("#video-status")).to_have_text("", timeout=30_000)  # no stale status
    page.get_by_text("synthetic phantom: sweep").click()  # an example: no upload event, still a preview
    _clip_preview_shown(page)
    page.locator("#video-file").get_by_role("button", name="Clear").click()  # the tab as it was found


def test_a_clear_answered_late_does_not_blank_the_next_files_result(page_with_late_clears, tmp_path):
    page = page_with_late_clears
    page.get_by_role("tab", name="Image").click()
    upload_image(page, ASSETS / "phantom_round_lesion.png")
    page.wait_for_function(PERCENT_SHOWN_JS, arg="#image-student-summary", timeout=60_000)
    refused = tmp_path / "second.png"  # a result unlike the first one's: its refusal
    refused.write_bytes(b"not an image")
    clear_and_drop_at_once(page, "#image-file", refused, "image/png")
    marker = page.locator("#image-agreement")
    marker.filter(has_text="second.png").wait_for(timeout=30_000)
    time.sleep(3)  # had the clear been answered after this result, it would have blanked it by now
    assert "second.png" in marker.inner_text()
    page.get_by_role("tab", name="Video").click()
    page.locator("#video-file input[type=file]").set_input_files(str(ASSETS / "phantom_sweep.mp4"))
    _clip_preview_shown(page)
    second_clip = shutil.copy(ASSETS / "phantom_sweep.mp4", tmp_path / "second_sweep.mp4")
    clear_and_drop_at_once(page, "#video-file", second_clip, "video/mp4")
    status = page.locator("#video-status")
    status.filter(has_text="second_sweep.mp4: ").wait_for(timeout=30_000)
    time.sleep(3)
    assert "second_sweep.mp4: " in status.inner_text()


def test_the_verdict_rule_with_its_sensitivity_and_specificity_is_next_to_the_verdict(page):
    page.get_by_role("tab", name="Image").click()
    upload_image(page, ASSETS / "phantom_round_lesion.png")
    # expect() retries: the Markdown panels render one after the other, and may redraw while settling.
    student_rule = "malignant when p(malignant) ≥ 12%: sensitivity 90%, specificity 57%"
    expect(page.locator("#image-student-summary")).to_contain_text(student_rule, timeout=60_000)
    expect(page.locator("#image-teacher-summary")).to_contain_text("most probable class", timeout=60_000)  # no point


def test_the_class_to_explain_can_be_picked(page):
    page.get_by_role("tab", name="Image").click()
    page.locator("#image-explain").get_by_text("malignant").click()
    page.locator("#image-teacher-summary").filter(has_text="evidence for malignant (chosen)").wait_for(timeout=60_000)
    assert "evidence for malignant (chosen)" in page.locator("#image-student-summary").inner_text()
    page.locator("#image-explain").get_by_text("predicted class").click()
    page.locator("#image-student-summary").filter(has_text="(predicted)").wait_for(timeout=60_000)


def test_a_refused_file_keeps_its_reason_on_the_page(page, tmp_path):
    bad = tmp_path / "scan.png"
    bad.write_bytes(b"not an image at all")
    page.get_by_role("tab", name="Image").click()
    upload_image(page, bad)
    marker = page.locator("#image-agreement")
    marker.filter(has_text="Not analysed").wait_for(timeout=30_000)
    time.sleep(12)  # longer than a toast lives
    assert "Not analysed" in marker.inner_text() and "scan.png" in marker.inner_text()
    page.screenshot(path=str(ARTIFACTS / "image_refused_file.png"), full_page=True)


def test_live_preview_is_never_mirrored_and_stop_clears_the_panel(page):
    page.get_by_role("tab", name="Live").click()
    page.get_by_text("Click to Access Webcam").click()
    page.locator("#live-stream video").wait_for()
    assert page.evaluate(VIDEO_TRANSFORM_JS) == "none"  # before start
    start = page.get_by_role("button", name="start stream")
    assert "Start live analysis" in start.inner_text()
    start.click()
    page.wait_for_function("() => /FPS/.test(document.querySelector('#live-stats').innerText)", timeout=60_000)
    assert page.evaluate(VIDEO_TRANSFORM_JS) == "none"  # while streaming
    stats = page.locator("#live-stats").inner_text()
    assert "processing" in stats and "ms/frame" in stats
    page.get_by_role("button", name="start stream").click()  # the same button stops
    page.locator("#live-stats").filter(has_text="Stopped").wait_for(timeout=30_000)
    assert page.evaluate(VIDEO_TRANSFORM_JS) == "none"  # after stop
    time.sleep(2)  # no late frame update overwrites the stopped panel
    assert "Stopped" in page.locator("#live-stats").inner_text()
    assert "FPS" not in page.locator("#live-stats").inner_text()


def test_video_tab_shows_the_first_frame_then_the_suspicious_segment_summary(page):
    page.get_by_role("tab", name="Video").click()
    page.locator("#video-file input[type=file]").set_input_files(str(ASSETS / "phantom_sweep.mp4"))
    _clip_preview_shown(page)
    page.get_by_role("button", name="Analyse clip").click()
    page.locator("#video-summary").filter(has_text="Clip summary").wait_for(timeout=120_000)
    assert "done" in page.locator("#video-status").inner_text()
    page.locator("#video-teacher-overlay img").wait_for(timeout=30_000)
    assert page.locator("#video-csv a").count() >= 1
    page.screenshot(path=str(ARTIFACTS / "video_review.png"), full_page=True)
