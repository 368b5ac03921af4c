"""The app's event handlers, as top-level functions: plain values in, plain values out.

Each takes the loaded models first (the layout binds them with ``functools.partial``) and the
component values after, in the order of the event's inputs; tests call them directly.
User-facing read errors become ``gr.Error`` (shown in the browser; the app keeps serving).
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr
import numpy as np
from fastrtc import AdditionalOutputs

from kdcore.app.live_session import LiveSession, RegionOfInterest
from kdcore.app.service import ROLES, ImageAnalysis, LoadedModels, analyse_image, prediction_markdown
from kdcore.app.video import (
    FrameResult,
    VideoReadError,
    analyse_clip,
    clip_summary_markdown,
    probe_clip,
    timeline_table,
)
from kdcore.imaging import ImageReadError, read_grey_image

USER_ERRORS = (ImageReadError, VideoReadError)


def user_errors(fn: Callable) -> Callable:
    """Turn our user-facing read errors into ``gr.Error``; generators stay generators."""

    if inspect.isgeneratorfunction(fn):  # Gradio must still see a generator to stream its yields

        @functools.wraps(fn)
        def generator_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except USER_ERRORS as exc:
                raise gr.Error(str(exc)) from exc

        return generator_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            raise gr.Error(str(exc)) from exc

    return wrapper


def overlay_values(analysis: ImageAnalysis | None, opacity: float) -> list[np.ndarray | None]:
    """Teacher and student Grad-CAM overlays (None where a model is missing)."""
    return [analysis.overlay(role, opacity) if analysis else None for role in ROLES]


def summary_values(analysis: ImageAnalysis | None) -> list[Any]:
    """Summary lines, probability labels and the agreement marker of a comparison panel."""
    if analysis is None:
        return [""] * len(ROLES) + [None] * len(ROLES) + [""]
    predictions = [analysis.predictions.get(role) for role in ROLES]
    return [
        *(prediction_markdown(role, p) for role, p in zip(ROLES, predictions)),
        *(p.probabilities if p else None for p in predictions),
        analysis.agreement_markdown(),
    ]


@user_errors
def predict(models: LoadedModels, path: str | None, opacity: float) -> tuple:
    """/predict and /predict_image: (JSON result, teacher overlay, student overlay, analysis state)."""
    if not path:
        return None, None, None, None
    if not models.cams:
        raise gr.Error("No model is loaded; see the message at the top of the page.")
    analysis = analyse_image(models, read_grey_image(path))
    return analysis.as_json(), *overlay_values(analysis, opacity), analysis


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


def ask_teacher(models: LoadedModels, live: LiveSession, opacity: float) -> list[Any]:
    """Teacher and student on the live stream's last frame: overlays, then the panel's text."""
    if live.last_grey is None:
        raise gr.Error("No frame yet: start the live stream first.")
    analysis = analyse_image(models, live.last_grey)
    return [*overlay_values(analysis, opacity), *summary_values(analysis)]


@user_errors
def analyse_video(models: LoadedModels, path: str | None, opacity: float) -> Iterator[tuple]:
    """/analyse_video: (overlay frame, status, timeline, summary) per frame, at the clip's pace."""
    if not path:
        raise gr.Error("Upload a clip first.")
    if models.student_cam is None:
        raise gr.Error("The video view needs the student checkpoint, which is not loaded.")
    info = probe_clip(path)
    if info.capped:
        gr.Warning(info.cap_message)
    results: list[FrameResult] = []
    overlay = None
    started = time.perf_counter()
    # Plain values only: for each gr.skip()/gr.update() output Gradio 5.50 adds a rebuilt
    # copy of the component to the session's blocks, more per clip, never freed.
    for overlay, result in analyse_clip(models.student_cam, path, info, opacity):
        results.append(result)
        wait = started + result.time_s - time.perf_counter()
        if wait > 0:
            time.sleep(wait)  # play back at the clip's own pace
        status = f"frame {result.index + 1}/{info.frames_to_analyse} · {result.label} · {result.latency_ms:.1f} ms"
        yield overlay, status, None, ""
    wall = time.perf_counter() - started
    yield overlay, "Done.", timeline_table(results), clip_summary_markdown(results, info, wall)
