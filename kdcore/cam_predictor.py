"""One grey frame -> prediction + Grad-CAM heat-map, as fast as available (live, video, image).

``load_cam_predictor(path)`` (or ``cam_predictor_for(predictor, path)``) picks, for ``NAME``:

1. ``onnxruntime``: the (logits, cam) graph. ``NAME.onnx`` is used when it was exported from
   these very weights (``python train.py export``); otherwise the graph is exported in memory
   at load time (a few seconds, nothing written to disk).
2. ``pytorch``: the same forward-pass Grad-CAM in PyTorch, if onnxruntime is not installed.
3. ``pytorch-grad-cam``: the reference implementation (hooks + backward pass), for models
   whose head does not start with global average pooling, e.g. the hybrid teacher.
"""

from __future__ import annotations

import importlib.util
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from kdcore.cam import ResizedGreyCam, grad_cam, supports_forward_cam
from kdcore.inference import Prediction, Predictor, load_predictor

BACKENDS = ("auto", "onnxruntime", "pytorch", "pytorch-grad-cam")

CamRunner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # (1, 1, S, S) uint8 -> (logits, cam)


class CamPredictor(Protocol):
    """Prediction and (S, S) float32 heat-map in [0, 1] for a grey HxW uint8 frame."""

    backend: str
    class_names: tuple[str, ...]
    predictor: Predictor  # the plain model, for predictions without a heat-map

    def predict_with_cam(self, grey: np.ndarray) -> tuple[Prediction, np.ndarray]: ...


class GradCamPredictor:
    """Reference: pytorch-grad-cam (a backward pass per frame); works for any model."""

    backend = "pytorch-grad-cam"

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.class_names = predictor.class_names

    def predict_with_cam(self, grey: np.ndarray) -> tuple[Prediction, np.ndarray]:
        return grad_cam(self.predictor, grey)


class ForwardCamPredictor:
    """Logits and the predicted class's Grad-CAM from one forward pass (ONNX or PyTorch).

    The prediction's latency covers preprocessing, the forward pass and the CAM.
    """

    def __init__(self, predictor: Predictor, run: CamRunner, backend: str) -> None:
        self.predictor = predictor
        self.run = run
        self.backend = backend
        self.class_names = predictor.class_names

    def predict_with_cam(self, grey: np.ndarray) -> tuple[Prediction, np.ndarray]:
        started = time.perf_counter()
        logits, cam = self.run(self.predictor.preprocess.resize(grey).unsqueeze(0).numpy())
        latency_ms = (time.perf_counter() - started) * 1000
        return self.predictor.prediction_from_logits(torch.from_numpy(logits), latency_ms), cam[0]


def torch_cam_runner(module: ResizedGreyCam) -> CamRunner:
    @torch.inference_mode()
    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, cam = module(torch.from_numpy(batch))
        return logits.numpy(), cam.numpy()

    return run


def onnx_cam_predictor(path: str | Path, predictor: Predictor, threads: int | None = None) -> ForwardCamPredictor:
    """onnxruntime backend: ``NAME.onnx`` if exported from these weights, else an in-memory export."""
    from kdcore.onnx_runtime import OnnxPredictor, export_onnx, onnx_paths, onnx_session, onnx_weights_sha256

    onnx_path, _ = onnx_paths(path)
    if onnx_path.is_file() and onnx_weights_sha256(onnx_path) == predictor.meta.weights_sha256:
        session = onnx_session(onnx_path, threads)
    else:
        if onnx_path.is_file():
            warnings.warn(f"{onnx_path.name} was exported from other weights; exporting again in memory", stacklevel=2)
        session = onnx_session(export_onnx(predictor.model, predictor.meta).SerializeToString(), threads)
    onnx_predictor = OnnxPredictor(session, predictor.meta, name=predictor.name)
    return ForwardCamPredictor(onnx_predictor, onnx_predictor.model.logits_and_cam, "onnxruntime")


def load_cam_predictor(path: str | Path, backend: str = "auto", threads: int | None = None) -> CamPredictor:
    """The fastest available CAM predictor for a checkpoint (see the module docstring).

    ``backend`` forces one of ``BACKENDS``; ``threads`` sets onnxruntime's intra-op threads
    (None: its default).
    """
    return cam_predictor_for(load_predictor(path), path, backend, threads)


def cam_predictor_for(
    predictor: Predictor, path: str | Path, backend: str = "auto", threads: int | None = None
) -> CamPredictor:
    """``load_cam_predictor`` for an already loaded predictor of checkpoint ``path``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    forward_cam = supports_forward_cam(predictor.model)
    if backend == "pytorch-grad-cam" or (backend == "auto" and not forward_cam):
        return GradCamPredictor(predictor)
    if not forward_cam:
        raise ValueError(f"{Path(path).name}: no forward-pass Grad-CAM for this head; use 'pytorch-grad-cam'")
    if backend == "onnxruntime" or (backend == "auto" and _has_onnxruntime()):
        return onnx_cam_predictor(path, predictor, threads)
    module = ResizedGreyCam(predictor.model, predictor.preprocess)
    return ForwardCamPredictor(predictor, torch_cam_runner(module), "pytorch")


def _has_onnxruntime() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None
