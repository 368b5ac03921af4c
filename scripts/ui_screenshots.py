"""Screenshots of every tab, as a new user sees them, for the README: ``reports/ui/*.png``.

python -m scripts.ui_screenshots [--checkpoints DIR] [--out reports/ui]

Serves the app (the shipped checkpoints by default) on a free local port and drives Debian
Chromium through the Image tab (an example, then a file it refuses), Video, Batch and Live (a
fake camera playing the phantom sweep), then renders the case report of the Image tab's
example. Needs playwright and /usr/bin/chromium (scripts/install_browser.sh).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from kdcore.app.layout import AppSettings, launch_in_background
from kdcore.app.report import write_case_report
from kdcore.app.service import analyse_image, load_models
from kdcore.config import REPO_ROOT
from kdcore.imaging import read_grey_image
from scripts.live_browser import chromium_page, clip_frames, start_live_stream, write_y4m
from scripts.loadtest import free_local_port

ASSETS = REPO_ROOT / "assets"


def _image_tab(page, out: Path, bad_file: Path) -> None:
    page.get_by_role("tab", name="Image").click()
    page.locator("#image-file input[type=file]").set_input_files(str(ASSETS / "phantom_round_lesion.png"))
    page.wait_for_function("() => /\\d+%/.test(document.querySelector('#image-student-summary').innerText)")
    page.locator("#image-teacher-overlay img").wait_for()
    page.get_by_role("button", name="Save case report").click()
    page.locator("#image-report a").wait_for(timeout=60_000)
    page.screenshot(path=str(out / "image.png"), full_page=True)
    page.locator("#image-file").get_by_role("button", name="Clear").click()
    page.locator("#image-file input[type=file]").set_input_files(str(bad_file))
    page.locator("#image-agreement").filter(has_text="Not analysed").wait_for(timeout=30_000)
    page.screenshot(path=str(out / "image_refused_file.png"), full_page=True)


def _video_tab(page, out: Path) -> None:
    page.get_by_role("tab", name="Video").click()
    page.locator("#video-file input[type=file]").set_input_files(str(ASSETS / "phantom_sweep.mp4"))
    page.locator("#video-status").filter(has_text="Press Analyse clip").wait_for(timeout=30_000)
    page.get_by_role("button", name="Analyse clip").click()
    page.locator("#video-summary").filter(has_text="Clip summary").wait_for(timeout=180_000)
    page.locator("#video-teacher-overlay img").wait_for(timeout=60_000)
    page.screenshot(path=str(out / "video.png"), full_page=True)


def _live_tab(page, url: str, out: Path) -> None:
    start_live_stream(page, url)
    page.wait_for_function("() => /FPS/.test(document.querySelector('#live-stats').innerText)", timeout=60_000)
    page.wait_for_timeout(3000)
    page.screenshot(path=str(out / "live.png"), full_page=True)


def _batch_tab(page, out: Path) -> None:
    page.get_by_role("tab", name="Batch").click()
    files = [str(p) for p in sorted(ASSETS.glob("*.png"))]
    page.locator("#batch-files input[type=file]").set_input_files(files)
    page.locator("#batch-files").filter(has_text="phantom_round_lesion").wait_for(timeout=30_000)  # uploaded
    page.get_by_role("button", name="Analyse all").click()
    page.locator("#batch-metrics").filter(has_text="files analysed").wait_for(timeout=120_000)
    page.screenshot(path=str(out / "batch.png"), full_page=True)


def take_screenshots(checkpoints: Path, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    demo = launch_in_background(AppSettings(checkpoints=checkpoints, port=free_local_port()))
    with tempfile.TemporaryDirectory() as tmp:
        bad_file = Path(tmp) / "scan.png"
        bad_file.write_bytes(b"this is not an image")
        y4m = write_y4m(clip_frames(ASSETS / "phantom_sweep.mp4"), Path(tmp) / "camera.y4m")
        try:
            with chromium_page(y4m) as page:
                page.goto(demo.local_url)
                _image_tab(page, out, bad_file)
                _video_tab(page, out)
                _batch_tab(page, out)
                _live_tab(page, demo.local_url, out)
        finally:
            demo.close()
    models = load_models(checkpoints)  # the case report, as the button renders it (PNG here)
    analysis = analyse_image(models, read_grey_image(ASSETS / "phantom_round_lesion.png"))
    write_case_report(models, analysis, 0.4, out / "case_report.png", "phantom_round_lesion.png")
    return sorted(out.glob("*.png"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=Path, default=REPO_ROOT / "checkpoints")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "reports" / "ui")
    args = parser.parse_args(argv)
    for path in take_screenshots(args.checkpoints, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
