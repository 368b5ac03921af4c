"""ONNX export of a student (its Grad-CAM as a second output) and INT8 static quantisation,
with the parity and accuracy checks of both graphs.

python train.py export --checkpoint checkpoints/student            # NAME.onnx + NAME.int8.onnx
python train.py export --checkpoint checkpoints/student --accuracy  # + test accuracy fp32 vs INT8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quant_pre_process, quantize_static
from torch import nn

from kdcore.cam import ResizedGreyCam
from kdcore.checkpoint import CheckpointMeta, load_checkpoint
from kdcore.config import DEFAULT_DATA_DIR, DEFAULT_SPLIT_FILE
from kdcore.data import read_split_file
from kdcore.imaging import read_grey_image
from kdcore.inference import Predictor
from kdcore.metrics import evaluate_predictions
from kdcore.onnx_runtime import INPUT_NAME, OUTPUT_NAMES, export_onnx, load_onnx_predictor, onnx_paths, onnx_session
from kdcore.transforms import Preprocess


def max_abs_differences(
    model: nn.Module, meta: CheckpointMeta, session: ort.InferenceSession, small: torch.Tensor
) -> dict[str, float]:
    """Largest |PyTorch - ONNX| over a resized uint8 batch, for the logits and the CAM."""
    with torch.inference_mode():
        expected = ResizedGreyCam(model, Preprocess(meta.preprocess))(small)
    actual = session.run(list(OUTPUT_NAMES), {INPUT_NAME: small.numpy()})
    return {name: float(np.abs(want.numpy() - got).max()) for name, want, got in zip(OUTPUT_NAMES, expected, actual)}


class ResizedCalibrationImages(CalibrationDataReader):
    """Feeds grey images, resized one by one as the graph expects, to the INT8 calibrator."""

    def __init__(self, greys: Sequence[np.ndarray], preprocess: Preprocess) -> None:
        self.greys = greys
        self.preprocess = preprocess
        self._batches: Iterator[dict[str, np.ndarray]] = self._feeds()

    def _feeds(self) -> Iterator[dict[str, np.ndarray]]:
        for grey in self.greys:
            yield {INPUT_NAME: self.preprocess.resize(grey).unsqueeze(0).numpy()}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def rewind(self) -> None:
        self._batches = self._feeds()


def nodes_off_the_logits_path(proto: onnx.ModelProto) -> list[str]:
    """Names of the nodes that only compute the CAM (everything ``logits`` does not depend on)."""
    producers = {output: node.name for node in proto.graph.node for output in node.output}
    inputs = {node.name: node.input for node in proto.graph.node}
    needed, pending = set(), [OUTPUT_NAMES[0]]
    while pending:
        name = producers.get(pending.pop())
        if name is not None and name not in needed:
            needed.add(name)
            pending.extend(inputs[name])
    return [node.name for node in proto.graph.node if node.name not in needed]


def name_every_node(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Unique names for unnamed nodes: quantisation excludes nodes by name."""
    for index, node in enumerate(proto.graph.node):
        node.name = node.name or f"{node.op_type}_{index}"
    return proto


def share_dequantized_weights(original: onnx.ModelProto, quantized: onnx.ModelProto) -> None:
    """Let fp32 (CAM) nodes read the dequantized copy of weights they share with quantized
    nodes, and drop the fp32 originals: the INT8 file then holds each weight once."""
    initializers = {init.name for init in quantized.graph.initializer}
    dequantized = {node.output[0] for node in quantized.graph.node if node.op_type == "DequantizeLinear"}
    before = {node.name: node.input for node in original.graph.node}
    replacement = {
        old: new
        for node in quantized.graph.node
        for old, new in zip(before.get(node.name, ()), node.input)
        if old in initializers and new in dequantized
    }
    for node in quantized.graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = replacement.get(name, name)
    used = {name for node in quantized.graph.node for name in node.input}
    unused = [init for init in quantized.graph.initializer if init.name not in used]
    for init in unused:
        quantized.graph.initializer.remove(init)


def quantize_int8(fp32_path: Path, int8_path: Path, calibration: ResizedCalibrationImages) -> Path:
    """Static INT8 (QDQ, per-channel weights, min-max activations) of the classifier path;
    the CAM arithmetic after it stays in fp32 (on the dequantized weights)."""
    with tempfile.TemporaryDirectory() as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "quantized.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        original = name_every_node(onnx.load(str(prepared)))
        onnx.save(original, str(prepared))
        quantize_static(
            str(prepared),
            str(quantized),
            calibration,
            nodes_to_exclude=nodes_off_the_logits_path(original),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        proto = onnx.load(str(quantized))
    share_dequantized_weights(original, proto)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(int8_path))
    return int8_path


def split_images(data_dir: Path, split_file: Path, split: str, count: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """Grey images and labels of one split; ``count`` > 0 takes that many spread evenly."""
    records = [r for r in read_split_file(split_file) if r.split == split]
    if count > 0:
        records = [records[i] for i in np.linspace(0, len(records) - 1, min(count, len(records))).astype(int)]
    return [read_grey_image(Path(data_dir) / r.file) for r in records], [r.label for r in records]


def file_mb(path: Path) -> float:
    """Size in MB of 2**20 bytes, the unit of the paper's 438.8 MB / 5.9 MB."""
    return Path(path).stat().st_size / 2**20


def export_checkpoint(
    checkpoint: Path, calibration_greys: Sequence[np.ndarray], int8: bool = True, out_dir: Path | None = None
) -> dict[str, Any]:
    """Write NAME.onnx (+ NAME.int8.onnx) next to the checkpoint (or into ``out_dir``); report
    sizes and the largest PyTorch-vs-ONNX differences on the calibration images."""
    model, meta = load_checkpoint(checkpoint)
    fp32_path, int8_path = onnx_paths(checkpoint if out_dir is None else Path(out_dir) / Path(checkpoint).name)
    fp32_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(export_onnx(model, meta), str(fp32_path))
    preprocess = Preprocess(meta.preprocess)
    small = torch.stack([preprocess.resize(g) for g in calibration_greys[:16]])
    report: dict[str, Any] = {
        "onnx": str(fp32_path),
        "onnx_mb": round(file_mb(fp32_path), 3),
        "max_abs_diff_fp32": max_abs_differences(model, meta, onnx_session(fp32_path), small),
    }
    if int8:
        quantize_int8(fp32_path, int8_path, ResizedCalibrationImages(calibration_greys, preprocess))
        report |= {
            "int8_onnx": str(int8_path),
            "int8_onnx_mb": round(file_mb(int8_path), 3),
            "max_abs_diff_int8": max_abs_differences(model, meta, onnx_session(int8_path), small),
            "calibration_images": len(calibration_greys),
        }
    return report


def score_predictor(predictor: Predictor, greys: Sequence[np.ndarray], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy and balanced accuracy of a predictor on labelled grey images."""
    probs = predictor.probabilities(predictor.logits_for(list(greys))).numpy()
    y_true = np.array([predictor.class_names.index(label) for label in labels])
    result = evaluate_predictions(y_true, probs)
    return {key: result[key] for key in ("n", "accuracy", "balanced_accuracy", "macro_f1")}


def int8_accuracy(checkpoint: Path, data_dir: Path, split_file: Path) -> dict[str, Any]:
    """Test-split scores of the exported fp32 and INT8 graphs of a checkpoint, side by side."""
    greys, labels = split_images(data_dir, split_file, "test")
    fp32_path, int8_path = onnx_paths(checkpoint)
    for path in (fp32_path, int8_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run `python train.py export --checkpoint {checkpoint}` first")
    scores = {
        name: score_predictor(load_onnx_predictor(checkpoint, path), greys, labels)
        for name, path in (("fp32", fp32_path), ("int8", int8_path))
    }
    scores["accuracy_loss_points"] = round(100 * (scores["fp32"]["accuracy"] - scores["int8"]["accuracy"]), 2)
    return scores


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="student NAME (NAME.safetensors + NAME.json)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR, help="BUSI folder (default: %(default)s)")
    parser.add_argument("--split-file", type=Path, default=DEFAULT_SPLIT_FILE, help="default: %(default)s")
    parser.add_argument("--calibration-images", type=int, default=128, help="training images for INT8 calibration")
    parser.add_argument("--no-int8", action="store_true", help="export the fp32 graph only")
    parser.add_argument("--accuracy", action="store_true", help="also score fp32 vs INT8 on the test split")
    parser.add_argument("--out", type=Path, help="also write the report to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        greys, _ = split_images(args.data, args.split_file, "train", args.calibration_images)
        report = export_checkpoint(args.checkpoint, greys, int8=not args.no_int8)
        if args.accuracy:
            report["test_accuracy"] = int8_accuracy(args.checkpoint, args.data, args.split_file)
    except (FileNotFoundError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + os.linesep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
