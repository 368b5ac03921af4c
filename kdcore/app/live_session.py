"""One live scanning session: ROI crop, student + Grad-CAM per frame, smoothing, FPS, overlay.

A ``LiveSession`` lives in the browser session's ``gr.State``; the stream handler feeds it
frames and "ask the teacher" reads its last frame. Everything here is plain numpy/OpenCV.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import cv2
import numpy as np

from kdcore.cam_predictor import CamPredictor
from kdcore.imaging import colour_share, grey_from_bgr, not_bmode_warning
from kdcore.operating_point import decide, verdict_rule
from kdcore.overlay import overlay_heatmap

STATUS_BAR_HEIGHT = 28
PANEL_INTERVAL_S = 0.1  # side-panel refresh; the burned-in status bar updates every frame
ROI_COLOUR_BGR = (80, 200, 255)


@dataclass(frozen=True)
class RegionOfInterest:
    """Margins (percent of width / height) cut from each edge, e.g. the scanner's UI."""

    left: float = 0.0
    top: float = 0.0
    right: float = 0.0
    bottom: float = 0.0

    def box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(y0, y1, x0, x1) in pixels; never empty."""
        x0 = int(width * self.left / 100)
        x1 = max(x0 + 1, int(width * (1 - self.right / 100)))
        y0 = int(height * self.top / 100)
        y1 = max(y0 + 1, int(height * (1 - self.bottom / 100)))
        return y0, y1, x0, x1

    @property
    def is_full_frame(self) -> bool:
        return not any((self.left, self.top, self.right, self.bottom))

    def preview(self, grey: np.ndarray | None) -> np.ndarray:
        """RGB picture of what the crop keeps: the last live frame (or a blank 4:3 field before
        the stream starts) with the cut margins darkened and the box drawn."""
        base = grey if grey is not None else np.full((240, 320), 96, np.uint8)
        y0, y1, x0, x1 = self.box(*base.shape)
        shown = (cv2.cvtColor(base, cv2.COLOR_GRAY2RGB) // 3).astype(np.uint8)
        shown[y0:y1, x0:x1] = cv2.cvtColor(base[y0:y1, x0:x1], cv2.COLOR_GRAY2RGB)
        cv2.rectangle(shown, (x0, y0), (x1 - 1, y1 - 1), ROI_COLOUR_BGR[::-1], 2)
        return shown


class RunningMean:
    """Exponential moving average (of class probabilities, of latencies); ``weight`` 0: the last value."""

    def __init__(self) -> None:
        self.average: np.ndarray | None = None

    def update(self, probabilities: np.ndarray, weight: float) -> np.ndarray:
        if self.average is None or weight <= 0:
            self.average = probabilities
        else:
            self.average = weight * self.average + (1 - weight) * probabilities
        return self.average


class FrameRateMeter:
    """Running frames-per-second from the intervals between frames (EMA over ~1 s at 30 FPS)."""

    def __init__(self, weight: float = 0.95) -> None:
        self.weight = weight
        self.last_time: float | None = None
        self.mean_interval: float | None = None

    def tick(self, now: float) -> float:
        if self.last_time is not None:
            interval = max(now - self.last_time, 1e-6)
            self.mean_interval = (
                interval
                if self.mean_interval is None
                else self.weight * self.mean_interval + (1 - self.weight) * interval
            )
        self.last_time = now
        return 1.0 / self.mean_interval if self.mean_interval else 0.0


LATENCY_NAME = "processing"  # one definition everywhere: grey conversion + student + Grad-CAM + overlay
LATENCY_SMOOTHING = 0.9  # running mean over ~10 frames, shown in the frame and in the panel alike


@dataclass(frozen=True)
class LiveFrame:
    """What one processed frame shows: the overlay frame and the numbers behind it.
    ``latency_ms`` is the running mean of the per-frame processing time (``LATENCY_NAME``)."""

    frame_bgr: np.ndarray
    label: str
    probabilities: dict[str, float]
    latency_ms: float
    fps: float
    colour_share: float = 0.0  # of the frame: B-mode ultrasound is grey
    rule: str = ""  # how ``label`` was decided (the checkpoint's verdict rule)

    def status_text(self) -> str:
        flag = " | NOT B-MODE?" if not_bmode_warning(self.colour_share) else ""
        return (
            f"student: {self.label} {self.probabilities[self.label]:.0%} | "
            f"{LATENCY_NAME} {self.latency_ms:.1f} ms/frame | {self.fps:.1f} FPS{flag}"
        )

    def status_markdown(self) -> str:
        return (
            f"**Student**: {self.label} ({self.probabilities[self.label]:.0%}, smoothed) · "
            f"{LATENCY_NAME} **{self.latency_ms:.1f} ms/frame** · **{self.fps:.1f} FPS**\n\n"
            f"{LATENCY_NAME}: grey conversion + student + Grad-CAM + overlay, running mean; "
            "FPS: frames shown per second" + (f"\n\nVerdict rule: {self.rule}" if self.rule else "")
        ) + (f"\n\n{warning}" if (warning := not_bmode_warning(self.colour_share)) else "")


LIVE_STOPPED_MARKDOWN = "Stopped: no live analysis. Press the camera button to start again."


@dataclass
class LiveSession:
    """Per-browser-session state of the live tab (deep-copyable for ``gr.State``)."""

    smoother: RunningMean = field(default_factory=RunningMean)
    meter: FrameRateMeter = field(default_factory=FrameRateMeter)
    latency: RunningMean = field(default_factory=RunningMean)  # of the processing ms/frame
    last_grey: np.ndarray | None = None  # the region of interest of the last frame (what the models saw)
    last_frame_grey: np.ndarray | None = None  # the whole last frame (for the crop preview)
    last_panel_time: float = 0.0

    def process(
        self,
        cam_predictor: CamPredictor,
        frame_bgr: np.ndarray,
        roi: RegionOfInterest,
        smoothing: float,
        opacity: float,
    ) -> LiveFrame:
        """Student prediction + Grad-CAM on the ROI of one BGR frame -> annotated BGR frame."""
        started = time.perf_counter()
        grey_frame = grey_from_bgr(frame_bgr)
        y0, y1, x0, x1 = roi.box(*grey_frame.shape)
        grey = grey_frame[y0:y1, x0:x1]
        prediction, heatmap = cam_predictor.predict_with_cam(grey)
        raw = np.array([prediction.probabilities[name] for name in cam_predictor.class_names])
        smoothed = self.smoother.update(raw, smoothing)
        probabilities = dict(zip(cam_predictor.class_names, map(float, smoothed)))
        point = cam_predictor.predictor.meta.operating_point
        label = cam_predictor.class_names[int(decide(smoothed, cam_predictor.class_names, point))]
        self.last_grey = grey.copy()
        self.last_frame_grey = grey_frame

        annotated = frame_bgr.copy()
        annotated[y0:y1, x0:x1] = cv2.cvtColor(overlay_heatmap(grey, heatmap, opacity), cv2.COLOR_RGB2BGR)
        if not roi.is_full_frame:
            cv2.rectangle(annotated, (x0, y0), (x1 - 1, y1 - 1), ROI_COLOUR_BGR, 1)
        latency_ms = (time.perf_counter() - started) * 1000
        mean_latency = float(self.latency.update(np.array(latency_ms), LATENCY_SMOOTHING))
        fps = self.meter.tick(time.perf_counter())
        result = LiveFrame(
            annotated, label, probabilities, mean_latency, fps, colour_share(frame_bgr, step=8), verdict_rule(point)
        )
        return replace(result, frame_bgr=with_status_bar(annotated, result.status_text()))

    def panel_due(self, now: float) -> bool:
        """True at most every ``PANEL_INTERVAL_S``: the side panel need not redraw 30 times a second."""
        if now - self.last_panel_time < PANEL_INTERVAL_S:
            return False
        self.last_panel_time = now
        return True


def with_status_bar(frame: np.ndarray, text: str) -> np.ndarray:
    """The frame with a black bar above it, ``text`` right-aligned, so the image stays unobscured
    (the stream's Stop button covers the bottom edge, its label the top-left corner)."""
    bar = np.zeros((STATUS_BAR_HEIGHT, frame.shape[1], 3), dtype=np.uint8)
    (text_width, _), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
    origin = (max(8, frame.shape[1] - text_width - 8), 19)
    cv2.putText(bar, text, origin, cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    return np.vstack([bar, frame])
