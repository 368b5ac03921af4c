"""Real-browser test of the live tab: Debian Chromium (Playwright) with a fake camera fed by a
.y4m clip built from the Breast-USV frames, streaming over WebRTC to the in-process app.

Run with ``pytest -m browser``; needs /usr/bin/chromium (scripts/install_browser.sh).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from app_helpers import free_port, launch

from kdcore.app.live_session import LiveSession, RegionOfInterest
from kdcore.cam_predictor import load_cam_predictor
from kdcore.config import CLASS_NAMES, REPO_ROOT
from scripts.live_browser import CHROMIUM, chromium_page, clip_frames, start_live_stream, write_y4m

CLIP_FRAMES = REPO_ROOT.parent / "shared" / "data" / "breast_usv" / "BR001"
ARTIFACTS = REPO_ROOT / "test-artifacts"
MEASURE_SECONDS = 10.0
# Below 10 frames a second the view no longer follows a moving probe: that fails the test.
# The target is 30 FPS on an idle laptop (KD_MIN_BROWSER_FPS=30 enforces it); 2-core CI
# machines running the suite measured 9-30 FPS in single 10 s windows that began as soon as
# the first label showed, while WebRTC was still ramping its bitrate up.
MIN_FPS = float(os.environ.get("KD_MIN_BROWSER_FPS", "10"))
WARM_UP_SECONDS = 3.0
WINDOW_SECONDS = 5.0
MAX_WINDOWS = 4  # a slow stretch (another process on a shared CI host) gets more windows, not a pass

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="run scripts/install_browser.sh first"),
    pytest.mark.skipif(not CLIP_FRAMES.is_dir(), reason="Breast-USV frames not available"),
]

VIDEO_STATS_JS = """() => {
    const v = document.querySelector('#live-stream video');
    const q = v.getVideoPlaybackQuality();
    return {frames: q.totalVideoFrames, width: v.videoWidth, height: v.videoHeight, now: performance.now()};
}"""
# Mean |R - B| of the shown frame: the input is grey, so colour means the Grad-CAM overlay is there.
FRAME_COLOUR_JS = """() => {
    const v = document.querySelector('#live-stream video');
    const c = document.createElement('canvas');
    c.width = v.videoWidth; c.height = v.videoHeight;
    const ctx = c.getContext('2d');
    ctx.drawImage(v, 0, 0);
    const d = ctx.getImageData(0, 0, c.width, c.height).data;
    let sum = 0;
    for (let i = 0; i < d.length; i += 4) sum += Math.abs(d[i] - d[i + 2]);
    return sum / (d.length / 4);
}"""


def test_live_stream_in_chromium(tiny_checkpoints, tmp_path, capsys):
    y4m = write_y4m(clip_frames(CLIP_FRAMES), tmp_path / "breast_usv_640x480.y4m")
    demo = launch(tiny_checkpoints["student"].parent)
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        with chromium_page(y4m) as page:
            start_live_stream(page, demo.local_url)
            page.wait_for_function(
                "names => names.some(n => document.querySelector('#live-label').innerText.includes(n))",
                arg=list(CLASS_NAMES),
                timeout=30_000,
            )
            first_stats = page.locator("#live-stats").inner_text()

            time.sleep(WARM_UP_SECONDS)
            window_fps, start, end = browser_fps_windows(page)
            browser_fps = max(window_fps)
            shown_stats = page.locator("#live-stats").inner_text()
            colour = page.evaluate(FRAME_COLOUR_JS)
            page.screenshot(path=str(ARTIFACTS / "live_stream.png"), full_page=True)

            page.get_by_role("button", name="Freeze frame — ask the teacher").click()
            page.wait_for_function(
                "() => /(benign|malignant|normal)/.test(document.querySelector('#frozen-teacher-summary').innerText)",
                timeout=60_000,
            )
            page.locator("#frozen-teacher-overlay img").wait_for(timeout=30_000)
            page.locator("#frozen-student-overlay img").wait_for(timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "live_stream_teacher.png"), full_page=True)
    finally:
        demo.close()

    report = {
        "browser_fps": round(browser_fps, 1),
        "window_fps": [round(fps, 1) for fps in window_fps],
        "video_size": [end["width"], end["height"]],
        "on_screen_stats": shown_stats,
        "frame_colour": round(colour, 1),
    }
    (ARTIFACTS / "live_stream.json").write_text(json.dumps(report, indent=2))
    with capsys.disabled():  # shown in every run's output, not only on failure
        print(f"\nlive stream in Chromium: {report['browser_fps']} FPS (floor {MIN_FPS:g}); {report}")

    assert end["frames"] > start["frames"], "the overlay stream stopped"
    assert shown_stats != first_stats and "FPS" in shown_stats, "the on-screen numbers did not update"
    assert end["width"] == 640, f"the stream was scaled down to {end['width']}x{end['height']}"
    assert colour > 10, "the frame shown has no Grad-CAM colour"
    assert browser_fps >= MIN_FPS, f"{browser_fps:.1f} FPS in the browser at best (windows: {report['window_fps']})"


def browser_fps_windows(page) -> tuple[list[float], dict, dict]:
    """Frames shown per second in consecutive windows of ``WINDOW_SECONDS``, until one reaches
    ``MIN_FPS`` or ``MAX_WINDOWS`` were measured; with the first and last video stats."""
    first = stats = page.evaluate(VIDEO_STATS_JS)
    window_fps: list[float] = []
    while len(window_fps) < MAX_WINDOWS and (not window_fps or window_fps[-1] < MIN_FPS):
        time.sleep(WINDOW_SECONDS)
        now = page.evaluate(VIDEO_STATS_JS)
        window_fps.append((now["frames"] - stats["frames"]) / ((now["now"] - stats["now"]) / 1000))
        stats = now
    return window_fps, first, stats


def plain_gradio_streaming_demo(checkpoint: Path) -> gr.Blocks:
    """The same live handler behind Gradio's own webcam streaming (for comparison only)."""
    cam_predictor = load_cam_predictor(checkpoint)

    def annotate(frame_rgb: np.ndarray, session: LiveSession) -> np.ndarray:
        result = session.process(cam_predictor, frame_rgb[..., ::-1], RegionOfInterest(), 0.6, 0.4)
        return result.frame_bgr[..., ::-1]

    with gr.Blocks() as demo:
        session = gr.State(LiveSession())
        camera = gr.Image(
            sources=["webcam"],
            streaming=True,
            type="numpy",
            mirror_webcam=False,
            webcam_constraints={"video": {"width": 640, "height": 480}},
            elem_id="camera",
        )
        shown = gr.Image(format="jpeg", elem_id="shown")
        camera.stream(annotate, [camera, session], [shown], stream_every=1 / 30, time_limit=None, api_name="annotate")
    return demo


@pytest.mark.slow
def test_plain_gradio_streaming_fps_for_comparison(tiny_checkpoints, tmp_path):
    """Report only: how many overlay frames per second Gradio's HTTP image streaming shows."""
    y4m = write_y4m(clip_frames(CLIP_FRAMES), tmp_path / "breast_usv_640x480.y4m")
    demo = plain_gradio_streaming_demo(tiny_checkpoints["student"])
    demo.launch(prevent_thread_lock=True, quiet=True, server_port=free_port())
    try:
        with chromium_page(y4m) as page:
            page.goto(demo.local_url)
            page.locator("#camera").get_by_text("Click to Access Webcam").click()
            page.locator("#camera button[aria-label='start stream'], #camera button:has-text('Record')").first.click()
            page.locator("#shown img").wait_for(timeout=60_000)
            page.evaluate(
                """() => { window.shownFrames = 0;
                new MutationObserver(() => window.shownFrames++).observe(
                    document.querySelector('#shown'), {subtree: true, attributes: true, attributeFilter: ['src']}); }"""
            )
            time.sleep(MEASURE_SECONDS)
            plain_fps = page.evaluate("() => window.shownFrames") / MEASURE_SECONDS
            page.screenshot(path=str(ARTIFACTS / "plain_gradio_stream.png"))
    finally:
        demo.close()
    print(f"\nplain Gradio image streaming in Chromium: {plain_fps:.1f} FPS")
    (ARTIFACTS / "plain_gradio_stream.json").write_text(json.dumps({"browser_fps": round(plain_fps, 1)}))
    assert plain_fps > 0, "no overlay frame reached the page"
