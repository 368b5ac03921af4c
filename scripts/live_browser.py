"""Live sessions from a real browser: Debian Chromium (Playwright) with a fake camera fed by a
``.y4m`` clip streams over WebRTC to the app's Live tab. Used by the browser test and by the
load test's fresh-sessions mode; needs playwright (requirements-dev) and /usr/bin/chromium
(scripts/install_browser.sh)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np

CHROMIUM = Path("/usr/bin/chromium")
VIEWPORT = {"width": 1400, "height": 1000}
FRAMES_SHOWN_JS = "() => document.querySelector('#live-stream video')?.getVideoPlaybackQuality().totalVideoFrames > 5"


def write_y4m(frames: Iterable[np.ndarray], out: Path, size: tuple[int, int] = (640, 480), fps: int = 30) -> Path:
    """Chromium's fake-camera format: a YUV4MPEG2 header, then 'FRAME\\n' + I420 planes per BGR frame."""
    width, height = size
    with out.open("wb") as f:
        f.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for frame in frames:
            frame = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
            f.write(b"FRAME\n" + cv2.cvtColor(frame, cv2.COLOR_BGR2YUV_I420).tobytes())
    return out


def clip_frames(path: Path) -> list[np.ndarray]:
    """Every frame of a video file (BGR), or of a folder of images in name order."""
    if path.is_dir():
        return [cv2.imread(str(p)) for p in sorted(path.glob("*.jpg"))]
    capture = cv2.VideoCapture(str(path))
    frames = []
    while (read := capture.read())[0]:
        frames.append(read[1])
    capture.release()
    return frames


def chromium_args(y4m: Path) -> list[str]:
    return [
        "--no-sandbox",  # runs as root here
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-video-capture={y4m}",
    ]


@contextmanager
def chromium_page(y4m: Path) -> Iterator:
    """A Playwright page (1400x1000) in Debian Chromium whose fake camera plays ``y4m``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=chromium_args(y4m))
        try:
            yield browser.new_page(viewport=VIEWPORT)
        finally:
            browser.close()


def start_live_stream(page, url: str) -> None:
    """Open the app in ``page``, go to the Live tab and start streaming the fake camera."""
    page.goto(url)
    page.get_by_role("tab", name="Live").click()
    page.get_by_text("Click to Access Webcam").click()
    page.get_by_role("button", name="start stream").click()
    page.wait_for_function(FRAMES_SHOWN_JS, timeout=60_000)


def live_browser_sessions(url: str, y4m: Path, sessions: int, seconds: float) -> dict[str, int]:
    """``sessions`` new browser sessions one after another: each streams for ``seconds``, asks
    the teacher about the frozen frame, and closes. Counts sessions and failures."""
    from playwright.sync_api import sync_playwright

    counts = {"sessions": 0, "errors": 0}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=chromium_args(y4m))
        try:
            for _ in range(sessions):
                context = browser.new_context(viewport=VIEWPORT)
                try:
                    page = context.new_page()
                    start_live_stream(page, url)
                    time.sleep(seconds)
                    page.get_by_role("button", name="Freeze frame — ask the teacher").click()
                    page.locator("#frozen-teacher-overlay img").wait_for(timeout=60_000)
                except Exception:  # counted: the report says how many sessions failed
                    counts["errors"] += 1
                finally:
                    context.close()
                    counts["sessions"] += 1
        finally:
            browser.close()
    return counts
