"""What the app serves: the loaded models and teacher-vs-student analysis of one image.

No Gradio here: these functions take arrays and paths and return plain data, so they are
tested directly and reused by the image tab, the /predict API and "ask the teacher".
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from kdcore.cam import grad_cam
from kdcore.cam_predictor import CamPredictor, cam_predictor_for
from kdcore.checkpoint import CheckpointError, CheckpointMeta, checkpoint_paths
from kdcore.config import REPO_ROOT
from kdcore.inference import Prediction, Predictor, load_predictor
from kdcore.operating_point import OperatingPoint, verdict_rule
from kdcore.overlay import overlay_heatmap

DEFAULT_CHECKPOINT_DIR = REPO_ROOT / "checkpoints"
DISCLAIMER = (
    "**Research demo, not a diagnostic device.** Predictions and heat-maps must not be used for clinical decisions."
)
ROLES = ("teacher", "student")
DISPLAY_MAX_SIDE = 1024  # the analysed image kept for overlays is at most this large (per session)
HOW_TO_GET_CHECKPOINTS = (
    "Train them with `python train.py all` (writes checkpoints/), or copy the released "
    "`teacher.*` / `student.*` files into the checkpoints folder, then restart the app."
)


@dataclass
class LoadedModels:
    """The models the app could load, each as its CAM predictor (the student's runs Grad-CAM
    inside the forward pass, the teacher's through pytorch-grad-cam), with its checkpoint
    record, and a user-facing note for each one it could not load."""

    cams: dict[str, CamPredictor] = field(default_factory=dict)
    predictors: dict[str, Predictor] = field(default_factory=dict)  # the PyTorch models (any-class Grad-CAM)
    metas: dict[str, CheckpointMeta] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    model_card: str = ""

    @property
    def student_cam(self) -> CamPredictor | None:
        return self.cams.get("student")

    @property
    def status_markdown(self) -> str:
        """Empty when all is well, else what is missing and how to get it."""
        if not self.problems:
            return ""
        lines = "\n".join(f"- {problem}" for problem in self.problems)
        return f"**Some models are not available.**\n{lines}\n\n{HOW_TO_GET_CHECKPOINTS}"


def _load_role(folder: Path, role: str, models: LoadedModels) -> None:
    weights, config = checkpoint_paths(folder / role)
    missing = [p.name for p in (weights, config) if not p.is_file()]
    if missing:
        models.problems.append(f"{role}: checkpoint file(s) {', '.join(missing)} not found in the checkpoints folder.")
        return
    try:
        predictor = load_predictor(weights)  # loaded once; the CAM predictor wraps it
        models.cams[role] = cam_predictor_for(predictor, weights)
    except CheckpointError as exc:
        # Messages name files; strip the folder so no server path reaches the browser.
        models.problems.append(f"{role}: checkpoint is broken: {str(exc).replace(str(folder), '').lstrip('/')}")
        return
    models.predictors[role] = predictor
    models.metas[role] = predictor.meta


def load_models(folder: str | Path = DEFAULT_CHECKPOINT_DIR) -> LoadedModels:
    """Load teacher and student from ``folder``; never raises for a missing or broken file."""
    folder = Path(folder)
    models = LoadedModels()
    for role in ROLES:
        _load_role(folder, role, models)
    card = folder / "MODEL_CARD.md"
    models.model_card = card.read_text() if card.is_file() else ""
    return models


@dataclass(frozen=True)
class ImageAnalysis:
    """Predictions and Grad-CAM heat-maps of every loaded model on one grey image.

    It lives in the user's session: the image is a display-sized copy (``display_copy``) and the
    heat-maps are kept as 8-bit (``heatmap_bytes``), a quarter of float32, plenty for a colour map.
    """

    grey: np.ndarray
    predictions: dict[str, Prediction]
    heatmaps: dict[str, np.ndarray]
    total_ms: dict[str, float] = field(default_factory=dict)  # prediction + Grad-CAM, per model
    model_inputs: dict[str, np.ndarray] = field(default_factory=dict)  # each model's resized input (small)
    explained: str | None = None  # the class the heat-maps explain; None: each model's predicted class
    input_warning: str = ""  # e.g. the picture is in colour: not a B-mode scan
    operating_points: dict[str, OperatingPoint | None] = field(default_factory=dict)  # each model's verdict rule

    def explained_class(self, role: str) -> str:
        return self.explained or self.predictions[role].label

    def as_json(self) -> dict[str, dict[str, Any]]:
        """The /predict payload: ``{"teacher": {label, probabilities, latency_ms}, "student": {...}}``."""
        return {role: prediction.as_dict() for role, prediction in self.predictions.items()}

    def overlay(self, role: str, opacity: float) -> np.ndarray | None:
        if role not in self.heatmaps:
            return None
        return overlay_heatmap(self.grey, self.heatmaps[role].astype(np.float32) / 255.0, opacity)

    def agreement_markdown(self) -> str:
        """A visible agree / disagree marker for the clinician."""
        if len(self.predictions) < 2:
            return "Only one model is loaded: no comparison."
        teacher, student = self.predictions["teacher"], self.predictions["student"]
        if teacher.label == student.label:
            return f"### ✔ Teacher and student agree: **{teacher.label}**"
        return f"### ⚠ Disagreement: teacher says **{teacher.label}**, student says **{student.label}**"


def display_copy(grey: np.ndarray, max_side: int = DISPLAY_MAX_SIDE) -> np.ndarray:
    """``grey`` shrunk (area interpolation) so that its longer side is at most ``max_side``."""
    scale = max_side / max(grey.shape)
    if scale >= 1:
        return grey
    size = (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale)))
    return cv2.resize(grey, size, interpolation=cv2.INTER_AREA)


def analyse_image(models: LoadedModels, grey: np.ndarray) -> ImageAnalysis:
    """Run every loaded model (with Grad-CAM) on one HxW uint8 image; the analysis keeps a
    display-sized copy of it for the overlays (it lives in the user's session)."""
    predictions, heatmaps, total_ms, inputs, points = {}, {}, {}, {}, {}
    for role, cam in models.cams.items():
        started = time.perf_counter()
        predictions[role], heatmap = cam.predict_with_cam(grey)
        heatmaps[role] = heatmap_bytes(heatmap)
        total_ms[role] = (time.perf_counter() - started) * 1000
        inputs[role] = cam.predictor.preprocess.resize(grey)[0].numpy()
        points[role] = cam.predictor.meta.operating_point
    return ImageAnalysis(display_copy(grey), predictions, heatmaps, total_ms, inputs, operating_points=points)


def explain_class(models: LoadedModels, analysis: ImageAnalysis, class_name: str | None) -> ImageAnalysis:
    """The same analysis with heat-maps for ``class_name`` (None: each model's predicted class).
    A chosen class goes through the reference Grad-CAM (pytorch-grad-cam) of each model, on the
    very input the model saw; the predictions do not change."""
    if class_name == analysis.explained:
        return analysis
    heatmaps = {}
    for role, cam in models.cams.items():
        model_input = analysis.model_inputs[role]
        if class_name is None:
            _, heatmap = cam.predict_with_cam(model_input)
        else:
            predictor = models.predictors[role]
            _, heatmap = grad_cam(predictor, model_input, predictor.class_names.index(class_name))
        heatmaps[role] = heatmap_bytes(heatmap)
    return replace(analysis, heatmaps=heatmaps, explained=class_name)


def heatmap_bytes(heatmap: np.ndarray) -> np.ndarray:
    """A [0, 1] float heat-map as uint8 0..255 (rounded)."""
    return np.round(np.clip(heatmap, 0.0, 1.0) * 255).astype(np.uint8)


LOW_CONFIDENCE = 0.6  # a top class below this is flagged: the model is unsure


def prediction_markdown(
    role: str, prediction: Prediction | None, total_ms: float | None = None, point: OperatingPoint | None = None
) -> str:
    """One line per model: class, calibrated confidence (flagged when low) and latencies: the
    forward pass, and the whole analysis with Grad-CAM and overlay when known; then the verdict
    rule with its sensitivity / specificity when the model has an operating point."""
    if prediction is None:
        return f"**{role.capitalize()}**: not loaded"
    confidence = prediction.probabilities[prediction.label]
    flag = f" · ⚠ **low confidence** (top class below {LOW_CONFIDENCE:.0%})" if confidence < LOW_CONFIDENCE else ""
    timing = f"forward pass {prediction.latency_ms:.1f} ms"
    if total_ms is not None:
        timing += f", with Grad-CAM {total_ms:.0f} ms"
    line = f"**{role.capitalize()}**: {prediction.label} ({confidence:.0%}, calibrated){flag} · {timing}"
    return f"{line}\n\nVerdict rule: {verdict_rule(point)}"
