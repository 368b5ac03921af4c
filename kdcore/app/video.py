"""Cine-loop analysis: decode a clip (capped), run the student + Grad-CAM on every frame,
then a per-frame probability timeline and a clip-level summary."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from kdcore.cam_predictor import CamPredictor
from kdcore.imaging import ImageReadError, colour_share, grey_from_bgr, not_bmode_warning
from kdcore.inference import Prediction
from kdcore.overlay import overlay_heatmap

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".gif", ".webm", ".mkv")
MAX_CLIP_SECONDS = 60.0
MAX_VIDEO_BYTES = 200 * 1024 * 1024
FALLBACK_FPS = 10.0  # when the container does not state a sensible frame rate (often GIFs)


class VideoReadError(ValueError):
    """A file that is not a usable video; the message is meant for the user."""


@dataclass(frozen=True)
class ClipInfo:
    name: str
    fps: float
    total_frames: int
    frames_to_analyse: int
    colour_share: float = 0.0  # of the first frame: B-mode ultrasound is grey

    @property
    def capped(self) -> bool:
        return self.frames_to_analyse < self.total_frames

    @property
    def cap_message(self) -> str:
        if not self.capped:
            return ""
        return (
            f"{self.name} is {self.total_frames / self.fps:.0f} s long; only the first "
            f"{MAX_CLIP_SECONDS:.0f} s ({self.frames_to_analyse} frames) are analysed."
        )


@dataclass(frozen=True)
class FrameResult:
    index: int
    time_s: float
    label: str
    probabilities: dict[str, float]
    latency_ms: float

    @classmethod
    def of(cls, index: int, fps: float, prediction: Prediction) -> FrameResult:
        """Frame ``index`` of a clip at ``fps`` and the student's prediction on it."""
        return cls(index, index / fps, prediction.label, prediction.probabilities, prediction.latency_ms)


def probe_clip(path: str | Path) -> ClipInfo:
    """Check that ``path`` is a readable clip and work out how many frames to analyse."""
    path = Path(path)
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise VideoReadError(f"{path.name}: not a supported video (use {', '.join(VIDEO_SUFFIXES)}).")
    if not path.is_file() or path.stat().st_size == 0:
        raise VideoReadError(f"{path.name}: file is empty.")
    if path.stat().st_size > MAX_VIDEO_BYTES:
        raise VideoReadError(f"{path.name}: file is larger than {MAX_VIDEO_BYTES // 2**20} MB.")
    capture = cv2.VideoCapture(str(path))
    try:
        ok, first = capture.read() if capture.isOpened() else (False, None)
        if not ok:
            raise VideoReadError(
                f"{path.name}: not a readable video (no frame could be decoded: "
                "the file is damaged, empty or uses a codec that is not supported)."
            )
        fps = capture.get(cv2.CAP_PROP_FPS)
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    finally:
        capture.release()
    fps = fps if 1.0 <= fps <= 240.0 else FALLBACK_FPS
    total = max(total, 1)
    return ClipInfo(path.name, fps, total, min(total, int(MAX_CLIP_SECONDS * fps)), colour_share(first))


def iter_grey_frames(path: str | Path, info: ClipInfo) -> Iterator[np.ndarray]:
    """Decoded frames as HxW uint8 (the uploads' grey conversion), at most ``info.frames_to_analyse``."""
    capture = cv2.VideoCapture(str(path))
    try:
        for _ in range(info.frames_to_analyse):
            ok, frame = capture.read()
            if not ok:
                return
            try:
                yield grey_from_bgr(frame, info.name)
            except ImageReadError as exc:
                raise VideoReadError(str(exc)) from exc
    finally:
        capture.release()


def analyse_clip(
    cam_predictor: CamPredictor, path: str | Path, info: ClipInfo, opacity: float
) -> Iterator[tuple[np.ndarray, FrameResult]]:
    """(RGB overlay frame, result) for each analysed frame, in order."""
    for index, grey in enumerate(iter_grey_frames(path, info)):
        prediction, heatmap = cam_predictor.predict_with_cam(grey)
        yield overlay_heatmap(grey, heatmap, opacity), FrameResult.of(index, info.fps, prediction)


def read_frame(path: str | Path, info: ClipInfo, index: int) -> np.ndarray:
    """Frame ``index`` (clamped to the analysed frames) as HxW uint8, decoded again from the file."""
    index = min(max(index, 0), info.frames_to_analyse - 1)
    capture = cv2.VideoCapture(str(path))
    try:
        capture.set(cv2.CAP_PROP_POS_FRAMES, index)
        ok, frame = capture.read()
    finally:
        capture.release()
    if not ok:  # a container that cannot seek: decode from the start
        for i, grey in enumerate(iter_grey_frames(path, info)):
            if i == index:
                return grey
        raise VideoReadError(f"{info.name}: frame {index + 1} could not be decoded.")
    try:
        return grey_from_bgr(frame, info.name)
    except ImageReadError as exc:
        raise VideoReadError(str(exc)) from exc


TIMELINE_X, TIMELINE_Y = "time (s)", "probability"


def timeline_table(results: list[FrameResult]) -> pd.DataFrame:
    """Long table (time, class, probability) for a per-class line plot."""
    rows = [
        {TIMELINE_X: round(r.time_s, 3), "class": name, TIMELINE_Y: p}
        for r in results
        for name, p in r.probabilities.items()
    ]
    return pd.DataFrame(rows, columns=[TIMELINE_X, "class", TIMELINE_Y])


def frames_csv(results: list[FrameResult], out: Path) -> Path:
    """Per-frame results as CSV: frame, time, label, one probability column per class, latency."""
    class_names = list(results[0].probabilities) if results else []
    table = pd.DataFrame(
        [
            {
                "frame": r.index + 1,
                "time_s": round(r.time_s, 3),
                "label": r.label,
                **{f"p_{name}": round(p, 5) for name, p in r.probabilities.items()},
                "latency_ms": round(r.latency_ms, 2),
            }
            for r in results
        ],
        columns=["frame", "time_s", "label", *(f"p_{n}" for n in class_names), "latency_ms"],
    )
    table.to_csv(out, index=False)
    return out


SUSPICIOUS_CLASS = "malignant"
SUSPICION_THRESHOLD = 0.5  # a frame whose malignant probability reaches this is flagged


@dataclass(frozen=True)
class Segment:
    """Consecutive frames whose malignant probability reaches the threshold."""

    first: FrameResult
    last: FrameResult
    peak: FrameResult
    frames: int
    fps: float

    @property
    def duration_s(self) -> float:
        return self.frames / self.fps

    @property
    def peak_probability(self) -> float:
        return self.peak.probabilities[SUSPICIOUS_CLASS]


def suspicious_segments(
    results: list[FrameResult], fps: float, threshold: float = SUSPICION_THRESHOLD
) -> list[Segment]:
    """Runs of frames with malignant probability >= ``threshold``, most suspicious first
    (highest peak, then longest)."""
    segments, run = [], []
    for result in [*results, None]:
        if result is not None and result.probabilities.get(SUSPICIOUS_CLASS, 0.0) >= threshold:
            run.append(result)
            continue
        if run:
            peak = max(run, key=lambda r: r.probabilities[SUSPICIOUS_CLASS])
            segments.append(Segment(run[0], run[-1], peak, len(run), fps))
            run = []
    return sorted(segments, key=lambda s: (-s.peak_probability, -s.frames))


def most_suspicious_frame(results: list[FrameResult]) -> FrameResult:
    """The frame with the highest malignant probability (the earliest of equals)."""
    return max(results, key=lambda r: (r.probabilities.get(SUSPICIOUS_CLASS, 0.0), -r.index))


def clip_summary_markdown(
    results: list[FrameResult], info: ClipInfo, wall_seconds: float, threshold: float = SUSPICION_THRESHOLD
) -> str:
    """Clip-level summary that never lets an average hide a finding: the most suspicious
    segment (when, how long, peak) comes first, then means, frame votes and speed."""
    if not results:
        return f"{info.name}: no frame could be decoded."
    class_names = list(results[0].probabilities)
    mean = {name: float(np.mean([r.probabilities[name] for r in results])) for name in class_names}
    votes = Counter(r.label for r in results)
    average_verdict = max(mean, key=mean.get)
    latencies = [r.latency_ms for r in results]
    segments = suspicious_segments(results, info.fps, threshold)
    if segments:
        top = segments[0]
        lines = [
            f"### Clip summary: ⚠ {SUSPICIOUS_CLASS} in part of the clip",
            f"- **most suspicious segment: {top.first.time_s:.1f}–{top.last.time_s:.1f} s** "
            f"({top.duration_s:.1f} s, {top.frames} frames), {SUSPICIOUS_CLASS} probability up to "
            f"**{top.peak_probability:.0%}** at {top.peak.time_s:.1f} s",
            f"- {len(segments)} segment(s) with {SUSPICIOUS_CLASS} ≥ {threshold:.0%}, "
            f"{sum(s.frames for s in segments)} of {len(results)} frames",
            f"- the whole-clip average says {average_verdict} ({mean[average_verdict]:.0%}): "
            "an average can hide a short finding, review the segment",
        ]
    else:
        peak = most_suspicious_frame(results)
        lines = [
            f"### Clip summary: **{average_verdict}** (mean probability {mean[average_verdict]:.0%})",
            f"- no frame reached {SUSPICIOUS_CLASS} ≥ {threshold:.0%}; highest "
            f"{peak.probabilities.get(SUSPICIOUS_CLASS, 0.0):.0%} at {peak.time_s:.1f} s",
        ]
    lines += [
        f"- {len(results)} frames analysed at {info.fps:.1f} FPS ({len(results) / info.fps:.1f} s of video)",
        "- mean probability: " + ", ".join(f"{name} {mean[name]:.0%}" for name in class_names),
        "- frames voting: " + ", ".join(f"{name} {votes.get(name, 0)}" for name in class_names),
        f"- student forward pass: median {np.median(latencies):.1f} ms; whole clip processed in {wall_seconds:.1f} s",
    ]
    if info.capped:
        lines.append(f"- ⚠️ {info.cap_message}")
    if warning := not_bmode_warning(info.colour_share):
        lines.insert(1, f"- {warning}")
    return "\n".join(lines)
