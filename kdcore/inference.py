"""Predictor: checkpoint -> preprocess -> logits -> calibrated probabilities, timed."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdcore.checkpoint import CheckpointMeta, load_checkpoint
from kdcore.operating_point import decide, verdict_rule
from kdcore.transforms import Preprocess


@dataclass(frozen=True)
class Prediction:
    label: str
    probabilities: dict[str, float]
    latency_ms: float
    rule: str = ""  # how ``label`` follows from the probabilities (the checkpoint's operating point)

    def as_dict(self) -> dict[str, Any]:
        verdict = {"label": self.label, "probabilities": self.probabilities, "latency_ms": round(self.latency_ms, 2)}
        return verdict | ({"verdict_rule": self.rule} if self.rule else {})


class Predictor:
    """A model with its checkpoint record: preprocessing, class names, calibration temperature."""

    def __init__(self, model: nn.Module, meta: CheckpointMeta, name: str = "model") -> None:
        self.model = model.eval()
        self.meta = meta
        self.name = name
        self.class_names: tuple[str, ...] = meta.class_names
        self.preprocess = Preprocess(meta.preprocess)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities: softmax of the logits over the fitted temperature."""
        return torch.softmax(logits / self.meta.calibration_temperature, dim=-1)

    def prediction_from_logits(self, logits: torch.Tensor, latency_ms: float) -> Prediction:
        probs = self.probabilities(logits.reshape(-1)).tolist()
        label = self.class_names[int(decide(np.array(probs), self.class_names, self.meta.operating_point))]
        rule = verdict_rule(self.meta.operating_point)
        return Prediction(label, dict(zip(self.class_names, map(float, probs))), latency_ms, rule)

    @torch.inference_mode()
    def predict(self, grey: np.ndarray) -> Prediction:
        """Classify one HxW uint8 grey image; latency covers preprocessing + forward."""
        started = time.perf_counter()
        logits = self.model(self.preprocess(grey).unsqueeze(0))
        return self.prediction_from_logits(logits, (time.perf_counter() - started) * 1000)

    @torch.inference_mode()
    def logits_for(self, greys: list[np.ndarray], batch_size: int = 32) -> torch.Tensor:
        """Raw (uncalibrated) logits (on the CPU) for many grey images, computed on the model's device."""
        device = next(self.model.parameters()).device
        chunks = []
        for i in range(0, len(greys), batch_size):
            batch = torch.stack([self.preprocess(g) for g in greys[i : i + batch_size]])
            chunks.append(self.model(batch.to(device)).float().cpu())
        return torch.cat(chunks)


def load_predictor(path: str | Path) -> Predictor:
    """Rebuild a predictor from ``NAME.safetensors`` + ``NAME.json`` alone."""
    model, meta = load_checkpoint(path)
    return Predictor(model, meta, name=Path(path).with_suffix("").name)
