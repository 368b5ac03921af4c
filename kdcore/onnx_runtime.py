"""Serving a student with onnxruntime: the (logits, cam) graph, exported from the checkpoint's
weights, and a ``Predictor`` backed by an inference session.

The graph takes the resized grey image, (B, 1, S, S) uint8 as ``Preprocess.resize`` makes it,
and applies ``Preprocess.normalize`` inside (traced from the same code, so the ONNX and PyTorch
paths share one preprocessing); it returns ``logits`` (B, C) and ``cam`` (B, S, S), the
Grad-CAM of the predicted class (see ``kdcore.cam``). No float work is left outside the graph.
Quantisation lives in ``kdcore.export``; nothing here imports it.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from kdcore.cam import ResizedGreyCam
from kdcore.checkpoint import CheckpointMeta, checkpoint_paths
from kdcore.inference import Prediction, Predictor
from kdcore.transforms import Preprocess

ONNX_OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "cam")
WEIGHTS_SHA256_KEY = "kdcore_weights_sha256"  # ONNX metadata: which checkpoint weights were exported


def onnx_paths(checkpoint: str | Path) -> tuple[Path, Path]:
    """(fp32, int8) ONNX paths next to a checkpoint: ``NAME.onnx`` and ``NAME.int8.onnx``."""
    stem = checkpoint_paths(checkpoint)[0].with_suffix("")
    return stem.with_suffix(".onnx"), stem.with_suffix(".int8.onnx")


def export_onnx(model: nn.Module, meta: CheckpointMeta) -> onnx.ModelProto:
    """(logits, cam) graph of a GAP-first student, with a dynamic batch axis."""
    preprocess = Preprocess(meta.preprocess)
    size = meta.preprocess.input_size
    buffer = io.BytesIO()
    # The TorchScript exporter needs no onnxscript and keeps the graph small and static.
    torch.onnx.export(
        ResizedGreyCam(model, preprocess).eval(),
        (torch.zeros(1, 1, size, size, dtype=torch.uint8),),
        buffer,
        dynamo=False,
        opset_version=ONNX_OPSET,
        input_names=[INPUT_NAME],
        output_names=list(OUTPUT_NAMES),
        dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)},
    )
    proto = onnx.load_from_string(buffer.getvalue())
    metadata = {
        WEIGHTS_SHA256_KEY: meta.weights_sha256,
        "class_names": json.dumps(list(meta.class_names)),
        "preprocess": json.dumps(asdict(meta.preprocess)),
    }
    onnx.helper.set_model_props(proto, metadata)
    onnx.checker.check_model(proto)
    return proto


def onnx_weights_sha256(path: str | Path) -> str:
    """The checkpoint weights hash recorded in an exported graph ('' if none)."""
    proto = onnx.load(str(path), load_external_data=False)
    return next((p.value for p in proto.metadata_props if p.key == WEIGHTS_SHA256_KEY), "")


def onnx_session(model: str | Path | bytes, threads: int | None = None) -> ort.InferenceSession:
    """CPU session; ``threads`` sets intra-op threads (None: onnxruntime's default)."""
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


class OnnxRuntimeModule(nn.Module):
    """A session behind the ``nn.Module`` call interface: resized uint8 batch -> logits."""

    def __init__(self, session: ort.InferenceSession) -> None:
        super().__init__()
        self.session = session

    def forward(self, small: torch.Tensor) -> torch.Tensor:
        (logits,) = self.session.run([OUTPUT_NAMES[0]], {INPUT_NAME: small.numpy()})
        return torch.from_numpy(logits)

    def logits_and_cam(self, small: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, cam = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: small})
        return logits, cam


class OnnxPredictor(Predictor):
    """``Predictor`` served by onnxruntime: only the resize happens outside the graph."""

    def __init__(self, session: ort.InferenceSession, meta: CheckpointMeta, name: str = "model") -> None:
        super().__init__(OnnxRuntimeModule(session), meta, name)

    def predict(self, grey: np.ndarray) -> Prediction:
        started = time.perf_counter()
        logits = self.model(self.preprocess.resize(grey).unsqueeze(0))
        return self.prediction_from_logits(logits, (time.perf_counter() - started) * 1000)

    def logits_for(self, greys: list[np.ndarray], batch_size: int = 32) -> torch.Tensor:
        chunks = [
            self.model(torch.stack([self.preprocess.resize(g) for g in greys[i : i + batch_size]]))
            for i in range(0, len(greys), batch_size)
        ]
        return torch.cat(chunks)


def load_onnx_predictor(checkpoint: str | Path, onnx_path: str | Path, threads: int | None = None) -> OnnxPredictor:
    """The ``Predictor`` interface (predict, logits_for, probabilities) on an exported graph.

    ``checkpoint`` provides the class names, preprocessing and calibrated temperature.
    """
    return OnnxPredictor(onnx_session(onnx_path, threads), CheckpointMeta.read(checkpoint), name=Path(onnx_path).name)
