"""Video tab, second round: a summary that surfaces the most suspicious segment (an average
never hides it), per-frame CSV, the teacher on the most suspicious frame, any frame on request."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from kdcore.app import handlers
from kdcore.app.result_files import new_result_path
from kdcore.app.service import load_models
from kdcore.app.video import (
    ClipInfo,
    FrameResult,
    clip_summary_markdown,
    frames_csv,
    most_suspicious_frame,
    probe_clip,
    read_frame,
    suspicious_segments,
)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
CLIP = ASSETS / "phantom_sweep.mp4"


def _result(index: int, fps: float, benign: float, malignant: float) -> FrameResult:
    probabilities = {"benign": benign, "malignant": malignant, "normal": round(1 - benign - malignant, 6)}
    return FrameResult(index, index / fps, max(probabilities, key=probabilities.get), probabilities, 5.0)


def _late_cancer_clip() -> tuple[list[FrameResult], ClipInfo]:
    """As on BR001: 4.5 s benign-looking, then 1.5 s with malignant at 0.75-0.8."""
    fps = 10.0
    results = [_result(i, fps, 0.62, 0.18) for i in range(45)]
    results += [_result(i, fps, 0.15, 0.75 + 0.05 * (i == 52)) for i in range(45, 60)]
    return results, ClipInfo("BR001.mp4", fps, 60, 60)


def test_summary_surfaces_a_late_malignant_segment_the_mean_would_hide():
    results, info = _late_cancer_clip()
    mean_malignant = np.mean([r.probabilities["malignant"] for r in results])
    assert mean_malignant < np.mean([r.probabilities["benign"] for r in results])  # the mean says benign
    summary = clip_summary_markdown(results, info, wall_seconds=6.0)
    headline = summary.splitlines()[0]
    assert "malignant" in headline and "benign" not in headline
    assert "4.5–5.9 s" in summary and "(1.5 s, 15 frames)" in summary
    assert "up to **80%** at 5.2 s" in summary
    assert "average" in summary  # the average is reported, but second


def test_segments_are_ordered_by_peak_then_length_and_a_quiet_clip_names_its_peak():
    fps = 10.0
    probs = [0.1, 0.6, 0.6, 0.6, 0.1, 0.9, 0.1, 0.55]
    results = [_result(i, fps, 0.05, p) for i, p in enumerate(probs)]
    segments = suspicious_segments(results, fps)
    assert [(s.first.index, s.frames) for s in segments] == [(5, 1), (1, 3), (7, 1)]
    quiet = [_result(i, fps, 0.7, p) for i, p in enumerate([0.1, 0.3, 0.2])]
    assert suspicious_segments(quiet, fps) == []
    assert most_suspicious_frame(quiet).index == 1
    summary = clip_summary_markdown(quiet, ClipInfo("q.mp4", fps, 3, 3), 1.0)
    assert summary.startswith("### Clip summary: **benign**") and "highest 30% at 0.1 s" in summary


def test_per_frame_csv_has_one_row_per_frame(tmp_path):
    results, _ = _late_cancer_clip()
    path = frames_csv(results, tmp_path / "frames.csv")
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == 60 and list(rows[0]) == [
        "frame", "time_s", "label", "p_benign", "p_malignant", "p_normal", "latency_ms",
    ]  # fmt: skip
    assert rows[52]["label"] == "malignant" and float(rows[52]["p_malignant"]) == pytest.approx(0.8)


def test_result_files_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    paths = []
    for i in range(7):
        paths.append(new_result_path(f"clip {i}/../x", ".csv", keep=3))
        paths[-1].write_text("x")
    assert sum(p.exists() for p in paths) == 3 and all(p.exists() for p in paths[-3:])
    assert paths[-1].name == "clip_6_.._x.csv" and paths[-1].parent.parent == tmp_path / "kd-results"


def test_read_frame_decodes_the_requested_frame():
    info = probe_clip(CLIP)
    first, last = read_frame(CLIP, info, 0), read_frame(CLIP, info, 10**6)  # clamped to the last frame
    assert first.shape == last.shape == (240, 320) and first.dtype == np.uint8
    assert not np.array_equal(first, last)


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
    return load_models(tiny_checkpoints["student"].parent)


def test_analyse_video_ends_with_csv_review_and_teacher_on_the_peak_frame(models, monkeypatch):
    monkeypatch.setattr(handlers.time, "sleep", lambda _: None)  # no real-time pacing in tests
    updates = list(handlers.analyse_video(models, str(CLIP), 0.4))
    assert len(updates) == 21
    frame, status, timeline, csv_path, review, teacher_overlay, student_overlay, *texts, summary = updates[-1]
    assert status.endswith("· done") and "frame 20/20" in status  # the last frame keeps its label
    assert list(timeline.columns) == ["time (s)", "class", "probability"]
    assert len(list(csv.DictReader(open(csv_path)))) == 20
    assert teacher_overlay.shape == student_overlay.shape and texts[0].startswith("**Teacher**")
    assert "most suspicious frame" in summary and summary.startswith("### Clip summary")
    assert all(u[3] is None and u[-1] == "" for u in updates[:-1])  # streamed frames carry no extras
    shown, shown_status = handlers.video_frame_at(models, review, 1.25, 0.4)
    assert shown.shape == (240, 320, 3) and "frame 13/20 · 1.2 s" in shown_status
    assert handlers.video_frame_at(models, None, 1.0, 0.4)[0] is None


def test_clip_preview_shows_the_first_frame():
    grey, note = handlers.clip_preview(str(CLIP))
    assert grey.shape == (240, 320) and "20 frames at 10.0 FPS" in note
    assert handlers.clip_preview(None) == (None, "")
