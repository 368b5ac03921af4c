"""Self-describing checkpoints: ``NAME.safetensors`` + ``NAME.json`` (model args, classes,
preprocessing, training config, split hash, metrics, weights sha256)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from kdcore.config import (
    ModelConfig,
    PreprocessConfig,
    model_config_from_dict,
    preprocess_config_from_dict,
    to_dict,
)
from kdcore.data import sha256_file
from kdcore.models import build_model

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, tampered with or not one of ours."""


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """(weights, config) paths for ``stem``, ``stem.safetensors`` or ``stem.json``."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    model_cfg: ModelConfig,
    preprocess: PreprocessConfig,
    class_names: tuple[str, ...],
    extra: dict[str, Any] | None = None,
    half: bool = False,
) -> Path:
    """Write weights (optionally fp16 storage) and the JSON config; return the weights path."""
    weights_path, config_path = checkpoint_paths(path)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.half() if half and v.is_floating_point() else v).detach().contiguous()
        for k, v in model.state_dict().items()
    }
    save_file(state, str(weights_path))
    config = {
        "format_version": FORMAT_VERSION,
        "model_args": to_dict(model_cfg),
        "class_names": list(class_names),
        "preprocess": to_dict(preprocess),
        "weights_file": weights_path.name,
        "weights_sha256": sha256_file(weights_path),
        **(extra or {}),
    }
    config_path.write_text(json.dumps(config, indent=2))
    return weights_path


def read_checkpoint_config(path: str | Path) -> dict[str, Any]:
    _, config_path = checkpoint_paths(path)
    if not config_path.is_file():
        raise CheckpointError(f"checkpoint config not found: {config_path}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path.name}: not valid JSON ({exc.msg})") from exc
    if not isinstance(config, dict) or "model_args" not in config:
        raise CheckpointError(f"{config_path.name}: not a kdcore checkpoint config")
    return config


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model (eval mode, fp32) from weights + config; verify the sha256."""
    weights_path, _ = checkpoint_paths(path)
    config = read_checkpoint_config(path)
    if not weights_path.is_file():
        raise CheckpointError(f"checkpoint weights not found: {weights_path}")
    if sha256_file(weights_path) != config.get("weights_sha256"):
        raise CheckpointError(
            f"{weights_path.name}: sha256 does not match its config; the file was modified "
            "or belongs to another checkpoint"
        )
    try:
        model_cfg = model_config_from_dict(config["model_args"])
        preprocess = preprocess_config_from_dict(config["preprocess"])
        # Architecture only: the real weights come from the safetensors file below.
        arch = ModelConfig(**{**to_dict(model_cfg), "cnn_init": "none", "vit_init": "none"})
        model = build_model(arch, preprocess.input_size)
        state = load_file(str(weights_path))
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except (SafetensorError, RuntimeError, TypeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{weights_path.name}: cannot be loaded ({exc})") from exc
    return model.eval(), config
