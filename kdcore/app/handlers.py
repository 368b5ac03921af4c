"""The app's event handlers, as top-level functions: plain values in, plain values out.

Each takes the loaded models first (the layout binds them with ``functools.partial``) and the
component values after, in the order of the event's inputs; tests call them directly.
User-facing read errors become ``gr.Error`` (shown in the browser; the app keeps serving).
"""

from __future__ import annotations

import functools
import inspect
import logging
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from fastrtc import AdditionalOutputs

from kdcore.app import batch
from kdcore.app.batch import BatchError, collect_batch
from kdcore.app.live_session import LIVE_STOPPED_MARKDOWN, LiveSession, RegionOfInterest
from kdcore.app.report import REPORT_FORMATS, write_case_report
from kdcore.app.result_files import new_result_path
from kdcore.app.service import ROLES, ImageAnalysis, LoadedModels, analyse_image, explain_class, prediction_markdown
from kdcore.app.video import (
    SUSPICION_THRESHOLD,
    ClipInfo,
    FrameResult,
    VideoReadError,
    analyse_clip,
    clip_summary_markdown,
    frames_csv,
    most_suspicious_frame,
    probe_clip,
    read_frame,
    timeline_table,
)
from kdcore.imaging import ImageReadError, file_colour_share, not_bmode_warning, read_grey_image
from kdcore.overlay import overlay_heatmap

USER_ERRORS = (ImageReadError, VideoReadError)


logger = logging.getLogger(__name__)


def user_error(exc: Exception) -> gr.Error:
    """A refused input: one log line (no traceback) and the reason for the user."""
    logger.info("refused input: %s", exc)
    return gr.Error(str(exc), print_exception=False)


def user_errors(fn: Callable) -> Callable:
    """Turn our user-facing read errors into ``gr.Error``; generators stay generators."""

    if inspect.isgeneratorfunction(fn):  # Gradio must still see a generator to stream its yields

        @functools.wraps(fn)
        def generator_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except USER_ERRORS as exc:
                raise user_error(exc) from None

        return generator_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            raise user_error(exc) from None

    return wrapper


def overlay_values(analysis: ImageAnalysis | None, opacity: float) -> list[np.ndarray | None]:
    """Teacher and student Grad-CAM overlays (None where a model is missing)."""
    return [analysis.overlay(role, opacity) if analysis else None for role in ROLES]


def explained_markdown(role: str, analysis: ImageAnalysis) -> str:
    """A model's line, and which class its Grad-CAM panel explains."""
    prediction = analysis.predictions.get(role)
    line = prediction_markdown(role, prediction, analysis.total_ms.get(role), analysis.operating_points.get(role))
    if prediction is None:
        return line
    how = "chosen" if analysis.explained else "predicted"
    return f"{line}\n\nGrad-CAM: evidence for **{analysis.explained_class(role)}** ({how})"


def summary_values(analysis: ImageAnalysis | None) -> list[Any]:
    """Summary lines, probability labels and the agreement marker of a comparison panel."""
    if analysis is None:
        return [""] * len(ROLES) + [None] * len(ROLES) + [""]
    predictions = [analysis.predictions.get(role) for role in ROLES]
    return [
        *(explained_markdown(role, analysis) for role in ROLES),
        *(p.probabilities if p else None for p in predictions),
        "\n\n".join(filter(None, [analysis.agreement_markdown(), analysis.input_warning])),
    ]


NO_MODEL = "No model is loaded; see the message at the top of the page."


@user_errors
def analyse_file(models: LoadedModels, path: str) -> ImageAnalysis:
    """Every loaded model on an image file, with the not-B-mode check (what /predict, the Image
    tab and /report share)."""
    if not models.cams:
        raise gr.Error(NO_MODEL)
    analysis = analyse_image(models, read_grey_image(path))
    return replace(analysis, input_warning=not_bmode_warning(file_colour_share(path)))


def predict(models: LoadedModels, path: str | None, opacity: float) -> tuple:
    """/predict and /predict_image: (JSON result, teacher overlay, student overlay, analysis state)."""
    if not path:
        return None, None, None, None
    analysis = analyse_file(models, path)
    return analysis.as_json(), *overlay_values(analysis, opacity), analysis


EXPLAIN_PREDICTED = "predicted class"


def explain(models: LoadedModels, analysis: ImageAnalysis | None, choice: str, opacity: float) -> list[Any]:
    """The Image tab's "Grad-CAM explains" choice: overlays, state and panel text for it."""
    if analysis is None:
        return [None, None, None, *summary_values(None)]
    analysis = explain_class(models, analysis, None if choice == EXPLAIN_PREDICTED else choice)
    return [*overlay_values(analysis, opacity), analysis, *summary_values(analysis)]


def empty_page() -> list[Any]:
    """The Image tab's outputs with no image: no JSON, overlays, analysis or panel text."""
    return [None, None, None, None, *summary_values(None)]


def cleared(empty: Callable[[], Sequence[Any]], still_empty: bool) -> tuple:
    """A cleared box's outputs: the box as it is, then ``empty()``. Nothing changes when a new
    file is in the box by the time the clear arrives (Gradio sends a second, late clear)."""
    outputs = (gr.skip(), *empty())
    return outputs if still_empty else (gr.skip(),) * len(outputs)


def page_prediction(
    models: LoadedModels, path: str | None, opacity: float, choice: str = EXPLAIN_PREDICTED
) -> list[Any]:
    """The Image tab's update: JSON, overlays, analysis state and the panel's text. A file that
    cannot be analysed leaves its reason in the panel, where the result would have been (a
    toast alone vanishes); the API (``predict``) raises instead."""
    if not path:
        return empty_page()
    try:
        analysis = analyse_file(models, path)
    except gr.Error as exc:
        return [{"error": exc.message}, None, None, None, *error_summary(exc.message)]
    return [analysis.as_json(), *explain(models, analysis, choice, opacity)]


def error_summary(message: str) -> list[Any]:
    """Panel text for a refused input: empty model lines, the reason in the marker's place."""
    return [""] * len(ROLES) + [None] * len(ROLES) + [f"### ❌ Not analysed\n{message}"]


def live_frame(
    models: LoadedModels,
    frame_bgr: np.ndarray,
    session: LiveSession,
    opacity: float,
    smoothing: float,
    crop_left: float,
    crop_top: float,
    crop_right: float,
    crop_bottom: float,
):
    """FastRTC handler: annotated frame every time, side-panel values at most ~10 times a second."""
    roi = RegionOfInterest(crop_left, crop_top, crop_right, crop_bottom)
    result = session.process(models.student_cam, frame_bgr, roi, smoothing, opacity)
    if session.panel_due(time.perf_counter()):
        return result.frame_bgr, AdditionalOutputs(result.probabilities, result.status_markdown())
    return result.frame_bgr


def live_panel(probabilities: dict[str, float], stats: str) -> tuple[dict[str, float], str]:
    """The live side panel shows the values the stream sent with its frame."""
    return probabilities, stats


STOP_SETTLE_S = 1.5  # panel updates of frames still in flight at Stop arrive within this


def live_stopped() -> tuple[None, str]:
    """After Stop, the side panel no longer shows the last label and frame rate as if live.
    It answers after the updates of frames still in flight, so none of them overwrites it."""
    time.sleep(STOP_SETTLE_S)
    return None, LIVE_STOPPED_MARKDOWN


def roi_preview(live: LiveSession, left: float, top: float, right: float, bottom: float) -> np.ndarray:
    """The crop box on the last live frame (or a blank field), as the sliders move."""
    return RegionOfInterest(left, top, right, bottom).preview(live.last_frame_grey)


def ask_teacher(models: LoadedModels, live: LiveSession, opacity: float) -> list[Any]:
    """Teacher and student on the live stream's last frame: overlays, then the panel's text."""
    if live.last_grey is None:
        raise gr.Error("No frame yet: start the live stream first.")
    analysis = analyse_image(models, live.last_grey)
    return [*overlay_values(analysis, opacity), *summary_values(analysis)]


@dataclass(frozen=True)
class ClipReview:
    """What the Video tab keeps per session after an analysis: the clip's path and per-frame
    results (small), so any frame can be decoded again and shown on request."""

    path: str
    info: ClipInfo
    results: tuple[FrameResult, ...]

    def index_at(self, seconds: float) -> int:
        return min(max(round(seconds * self.info.fps), 0), len(self.results) - 1)


@user_errors
def clip_preview(path: str | None) -> tuple[np.ndarray | None, str]:
    """The clip's first frame and what will be analysed, as soon as it is uploaded."""
    if not path:
        return None, ""
    info = probe_clip(path)
    grey = read_frame(path, info, 0)
    notes = " ".join(filter(None, [info.cap_message, not_bmode_warning(info.colour_share)]))
    return grey, f"{info.name}: {info.frames_to_analyse} frames at {info.fps:.1f} FPS. Press **Analyse clip**. {notes}"


def empty_clip_review(frame: np.ndarray | None = None, status: str = "", summary: str = "") -> tuple:
    """The Video tab's outputs (those of ``analyse_video``) with no review yet: the frame, the
    status and the summary given, no timeline, CSV, review state or panel (all empty by default:
    a cleared clip)."""
    return frame, status, None, None, None, None, None, *summary_values(None), summary


def frame_status(result: FrameResult, info: ClipInfo) -> str:
    return (
        f"frame {result.index + 1}/{info.frames_to_analyse} · {result.time_s:.1f} s · **{result.label}** "
        f"({result.probabilities[result.label]:.0%}) · student forward pass {result.latency_ms:.1f} ms"
    )


@user_errors
def analyse_video(models: LoadedModels, path: str | None, opacity: float) -> Iterator[tuple]:
    """/analyse_video, at the clip's pace: (overlay frame, status, timeline, per-frame CSV, review
    state, teacher and student overlays on the most suspicious frame, that panel's text, summary)."""
    if not path:
        raise gr.Error("Upload a clip first.")
    if models.student_cam is None:
        raise gr.Error("The video view needs the student checkpoint, which is not loaded.")
    info = probe_clip(path)
    if info.capped:
        gr.Warning(info.cap_message)
    results: list[FrameResult] = []
    overlay, status = None, ""
    started = time.perf_counter()
    # Plain values only: for each gr.skip()/gr.update() output Gradio 5.50 adds a rebuilt
    # copy of the component to the session's blocks, more per clip, never freed.
    for overlay, result in analyse_clip(models.student_cam, path, info, opacity):
        results.append(result)
        wait = started + result.time_s - time.perf_counter()
        if wait > 0:
            time.sleep(wait)  # play back at the clip's own pace
        status = frame_status(result, info)
        yield empty_clip_review(overlay, status)
    wall = time.perf_counter() - started
    point = models.student_cam.predictor.meta.operating_point
    threshold = point.threshold if point else SUSPICION_THRESHOLD
    if not results:
        yield empty_clip_review(overlay, status, clip_summary_markdown(results, info, wall, threshold))
        return
    peak = most_suspicious_frame(results)
    analysis = analyse_image(models, read_frame(path, info, peak.index))
    csv_path = frames_csv(results, new_result_path(f"{Path(info.name).stem}-frames", ".csv"))
    yield (
        overlay,
        f"{status} · done",
        timeline_table(results),
        str(csv_path),
        ClipReview(path, info, tuple(results)),
        *overlay_values(analysis, opacity),
        *summary_values(analysis),
        clip_summary_markdown(results, info, wall, threshold)
        + f"\n\nBelow: teacher and student on the most suspicious frame ({peak.time_s:.1f} s).",
    )


def video_frame_at(models: LoadedModels, review: ClipReview | None, seconds: float, opacity: float) -> tuple:
    """The analysed frame nearest ``seconds``, with the student's Grad-CAM, and its status line."""
    if review is None or models.student_cam is None:
        return None, "Analyse a clip first, then pick a time."
    index = review.index_at(seconds)
    try:
        grey = read_frame(review.path, review.info, index)
    except (VideoReadError, OSError) as exc:
        raise gr.Error(f"That frame cannot be shown any more ({exc}); upload the clip again.") from exc
    prediction, heatmap = models.student_cam.predict_with_cam(grey)
    status = frame_status(FrameResult.of(index, review.info.fps, prediction), review.info)
    return overlay_heatmap(grey, heatmap, opacity), status


def analyse_batch(
    models: LoadedModels,
    paths: list[str] | None,
    progress: gr.Progress = gr.Progress(),  # noqa: B008 (Gradio finds its progress bar by this default)
) -> tuple:
    """/batch: (sortable table, CSV of it, metrics Markdown, confusion-matrix PNG or None)."""
    if not paths:
        raise gr.Error("Drop images or a zip first.")
    if not models.cams:
        raise gr.Error(NO_MODEL)
    out = new_result_path("batch", ".csv").parent
    with tempfile.TemporaryDirectory(prefix="kd-batch-") as work_dir:
        try:
            items = collect_batch(list(paths), Path(work_dir))
        except BatchError as exc:
            raise user_error(exc) from None
        result = batch.analyse_batch(models, items, out, lambda done, total: progress(done / total, f"{done}/{total}"))
    csv_path = out / "batch_results.csv"
    result.table.to_csv(csv_path, index=False)
    confusion = str(result.confusion_png) if result.confusion_png else None
    return result.table, str(csv_path), result.metrics_markdown, confusion


def case_report(models: LoadedModels, analysis: ImageAnalysis | None, opacity: float, report_format: str) -> str:
    """The Image tab's "save case report": the analysis on screen as a PDF or PNG file."""
    if analysis is None:
        raise gr.Error("Analyse an image first.")
    out = new_result_path("case_report", f".{report_format}")
    return str(write_case_report(models, analysis, opacity, out))


def case_report_for_file(models: LoadedModels, path: str | None, opacity: float, report_format: str) -> str:
    """/report: analyse an image file and return its case report (PDF or PNG)."""
    if not path:
        raise gr.Error("Send an image file.")
    if report_format not in REPORT_FORMATS:
        raise gr.Error(f"report format must be one of {', '.join(REPORT_FORMATS)}.")
    analysis = analyse_file(models, path)
    out = new_result_path(f"case_report_{Path(path).stem}", f".{report_format}")
    return str(write_case_report(models, analysis, opacity, out, Path(path).name))
