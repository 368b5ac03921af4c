"""The live path: one grey frame -> student prediction + heat-map, as fast as possible."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kdcore.explain import grad_cam
from kdcore.inference import Prediction, Predictor, load_predictor


class CamPredictor:
    """Prediction and (S, S) heat-map in [0, 1] for a grey frame."""

    backend = "pytorch-grad-cam"

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.class_names = predictor.class_names

    def predict_with_cam(self, grey: np.ndarray) -> tuple[Prediction, np.ndarray]:
        return grad_cam(self.predictor, grey)


def load_cam_predictor(path: str | Path) -> CamPredictor:
    return CamPredictor(load_predictor(path))
