"""Grad-CAM heat-maps (pytorch-grad-cam) and overlays.

pytorch-grad-cam registers hooks on the model and is not thread-safe, so each call
builds its own ``GradCAM`` inside a context manager (hooks released on exit) while
holding the predictor's lock.
"""

from __future__ import annotations

import threading
import time
from weakref import WeakKeyDictionary

import cv2
import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from kdcore.inference import Prediction, Predictor
from kdcore.models import cam_target_layer

JPEG_QUALITY = 90
_LOCKS: WeakKeyDictionary[Predictor, threading.Lock] = WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _lock_for(predictor: Predictor) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(predictor, threading.Lock())


def grad_cam(predictor: Predictor, grey: np.ndarray, class_index: int | None = None) -> tuple[Prediction, np.ndarray]:
    """Prediction and an (S, S) Grad-CAM map in [0, 1] for the predicted (or given) class.

    The prediction's latency is the plain forward pass, measured separately from the CAM.
    The plain forward pass also runs under the lock: while GradCAM's hooks are registered,
    any other forward pass through the model would overwrite the captured activations.
    """
    batch = predictor.preprocess(grey).unsqueeze(0)
    with _lock_for(predictor):
        prediction = predictor.predict(grey)
        if class_index is None:
            class_index = predictor.class_names.index(prediction.label)
        target_layers = [cam_target_layer(predictor.model)]
        with torch.enable_grad(), GradCAM(model=predictor.model, target_layers=target_layers) as cam:
            heatmap = cam(input_tensor=batch, targets=[ClassifierOutputTarget(class_index)])[0]
    return prediction, heatmap.astype(np.float32)


def timed_grad_cam(predictor: Predictor, grey: np.ndarray) -> tuple[Prediction, np.ndarray, float]:
    """``grad_cam`` plus its total wall time in ms."""
    started = time.perf_counter()
    prediction, heatmap = grad_cam(predictor, grey)
    return prediction, heatmap, (time.perf_counter() - started) * 1000


def overlay_heatmap(image: np.ndarray, heatmap: np.ndarray, opacity: float = 0.4) -> np.ndarray:
    """RGB uint8 image with a JET-coloured heat-map blended in at ``opacity``."""
    rgb = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.ndim == 2 else image
    height, width = rgb.shape[:2]
    resized = cv2.resize(np.clip(heatmap, 0, 1), (width, height), interpolation=cv2.INTER_LINEAR)
    coloured = cv2.applyColorMap((resized * 255).astype(np.uint8), cv2.COLORMAP_JET)
    coloured = cv2.cvtColor(coloured, cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(rgb, 1.0 - float(opacity), coloured, float(opacity), 0.0)


def encode_jpeg(frame_bgr: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of a BGR frame (what the live and video streams send)."""
    ok, encoded = cv2.imencode(".jpg", frame_bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return encoded.tobytes()


def cam_peak(heatmap: np.ndarray, height: int, width: int) -> tuple[int, int]:
    """(row, col) of the heat-map maximum, in an image of the given size."""
    resized = cv2.resize(heatmap, (width, height), interpolation=cv2.INTER_LINEAR)
    row, col = np.unravel_index(int(np.argmax(resized)), resized.shape)
    return int(row), int(col)
