"""Self-describing checkpoints: ``NAME.safetensors`` + ``NAME.json``, read once into one typed
record, ``CheckpointMeta``; nothing else looks into the raw JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from kdcore.config import ModelConfig, PreprocessConfig, TrainConfig, train_config_from_dict
from kdcore.hashing import sha256_file
from kdcore.models import build_model
from kdcore.operating_point import OperatingPoint

FORMAT_VERSION = 2  # 2: the KD temperature is ``training.kd_temperature`` (1: ``training.temperature``)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, tampered with or not one of ours."""


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """(weights, config) paths for ``stem``, ``stem.safetensors`` or ``stem.json``."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


@dataclass(frozen=True)
class CheckpointMeta:
    """Everything a checkpoint says about itself besides its weights.

    ``calibration_temperature`` divides the logits before the softmax (fitted on validation);
    ``training.kd_temperature`` is the distillation temperature, a different thing.
    """

    model: ModelConfig
    preprocess: PreprocessConfig
    class_names: tuple[str, ...]
    weights_sha256: str = ""
    role: str = ""
    calibration_temperature: float = 1.0
    calibration: dict[str, float] = field(default_factory=dict)  # validation ECE before / after
    training: TrainConfig | None = None
    split_sha256: str = ""
    best_epoch: int = 0
    validation: dict[str, float] = field(default_factory=dict)  # scores at the best epoch
    history: tuple[dict[str, float], ...] = ()
    teacher_weights_sha256: str = ""
    operating_point: OperatingPoint | None = None  # the verdict's malignant threshold (chosen on validation)
    runtime: dict[str, Any] = field(default_factory=dict)  # where it trained: device, amp, ranks ...

    @property
    def architecture(self) -> str:
        """Short human name, e.g. ``feature_transformer + tf_efficientnet_lite0`` (a hybrid) or
        ``ensemble of tf_efficientnet_lite0 + tf_efficientnet_lite2``."""
        if self.model.kind == "ensemble":  # no global branch, whatever the record's field says
            return "ensemble of " + " + ".join((self.model.cnn_name, *self.model.ensemble_members))
        branches = (self.model.global_branch, self.model.cnn_name)
        return " + ".join(b for b in branches if b and b != "none")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "model_args": asdict(self.model),
            "class_names": list(self.class_names),
            "preprocess": asdict(self.preprocess),
            "weights_sha256": self.weights_sha256,
            "role": self.role,
            "calibration": {"temperature": self.calibration_temperature, **self.calibration},
            "training": asdict(self.training) if self.training else None,
            "split_sha256": self.split_sha256,
            "best_epoch": self.best_epoch,
            "validation": self.validation,
            "history": list(self.history),
            "teacher_weights_sha256": self.teacher_weights_sha256,
            "operating_point": self.operating_point.to_json() if self.operating_point else None,
            "runtime": self.runtime,
        }
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> CheckpointMeta:
        calibration = dict(raw.get("calibration") or {})
        training = raw.get("training")
        if training and raw.get("format_version", 1) < 2:
            training = {("kd_temperature" if k == "temperature" else k): v for k, v in training.items()}
        return cls(
            model=ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw["model_args"].items()}),
            preprocess=PreprocessConfig(
                input_size=int(raw["preprocess"]["input_size"]),
                mean=tuple(raw["preprocess"]["mean"]),
                std=tuple(raw["preprocess"]["std"]),
            ),
            class_names=tuple(raw["class_names"]),
            weights_sha256=str(raw.get("weights_sha256", "")),
            role=str(raw.get("role", "")),
            calibration_temperature=float(calibration.pop("temperature", 1.0)),
            calibration=calibration,
            training=train_config_from_dict(training) if training else None,
            split_sha256=str(raw.get("split_sha256", "")),
            best_epoch=int(raw.get("best_epoch", 0)),
            validation=dict(raw.get("validation") or {}),
            history=tuple(raw.get("history") or ()),
            teacher_weights_sha256=str(raw.get("teacher_weights_sha256", "")),
            operating_point=OperatingPoint.from_json(raw["operating_point"]) if raw.get("operating_point") else None,
            runtime=dict(raw.get("runtime") or {}),
        )

    @classmethod
    def read(cls, path: str | Path) -> CheckpointMeta:
        """The record of ``NAME`` (``NAME.json``); ``CheckpointError`` naming the file otherwise."""
        _, config_path = checkpoint_paths(path)
        if not config_path.is_file():
            raise CheckpointError(f"checkpoint config not found: {config_path}")
        try:
            raw = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{config_path.name}: not valid JSON ({exc})") from exc
        if not isinstance(raw, dict) or "model_args" not in raw:
            raise CheckpointError(f"{config_path.name}: not a kdcore checkpoint config")
        try:
            return cls.from_json(raw)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{config_path.name}: malformed checkpoint config ({exc!r})") from exc

    def selection_score(self, within_epochs: int = 0) -> tuple[float, float]:
        """(val balanced accuracy, -val loss) of the saved weights (for ``keep=last``, the last
        epoch's, not the schedule's best epoch); with ``within_epochs``, of the best epoch within
        that budget, so runs of different lengths are compared at one budget."""
        if not within_epochs:
            return self.validation["val_balanced_accuracy"], -self.validation["val_loss"]
        rows = [h for h in self.history if h["epoch"] <= within_epochs]
        return max((h["val_balanced_accuracy"], -h["val_loss"]) for h in rows)


def save_checkpoint(path: str | Path, model: nn.Module, meta: CheckpointMeta, half: bool = False) -> Path:
    """Write weights (optionally fp16 storage) and ``meta`` with their sha256; return the weights path."""
    weights_path, config_path = checkpoint_paths(path)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.half() if half and v.is_floating_point() else v).detach().contiguous()
        for k, v in model.state_dict().items()
    }
    save_file(state, str(weights_path))
    write_record(path, replace(meta, weights_sha256=sha256_file(weights_path)))
    return weights_path


def write_record(path: str | Path, meta: CheckpointMeta) -> Path:
    """Write ``meta`` as ``NAME.json`` beside its weights (the weights are not touched)."""
    weights_path, config_path = checkpoint_paths(path)
    config_path.write_text(json.dumps({**meta.to_json(), "weights_file": weights_path.name}, indent=2))
    return config_path


def load_checkpoint(path: str | Path) -> tuple[nn.Module, CheckpointMeta]:
    """Rebuild the model (eval mode, fp32) from weights + record; verify the sha256."""
    weights_path, _ = checkpoint_paths(path)
    meta = CheckpointMeta.read(path)
    if not weights_path.is_file():
        raise CheckpointError(f"checkpoint weights not found: {weights_path}")
    if sha256_file(weights_path) != meta.weights_sha256:
        raise CheckpointError(
            f"{weights_path.name}: sha256 does not match its config; the file was modified "
            "or belongs to another checkpoint"
        )
    try:
        # Architecture only: the real weights come from the safetensors file below.
        model = build_model(replace(meta.model, cnn_init="none", vit_init="none"), meta.preprocess.input_size)
        state = load_file(str(weights_path))
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except (SafetensorError, RuntimeError, TypeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{weights_path.name}: cannot be loaded ({exc})") from exc
    return model.eval(), meta
