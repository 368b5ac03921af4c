"""Checkpoints rebuild themselves, refuse tampering and foreign files, and never unpickle."""

from __future__ import annotations

import json
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from tiny_models import TINY_STUDENT, TINY_TEACHER

from kdcore.checkpoint import (
    CheckpointError,
    CheckpointMeta,
    checkpoint_paths,
    load_checkpoint,
    save_checkpoint,
    write_record,
)
from kdcore.config import CLASS_NAMES, OFFLINE, ModelConfig, PreprocessConfig
from kdcore.experiment.runs import best_by_validation
from kdcore.inference import load_predictor
from kdcore.models import WeightsError, build_model, read_state_dict

SIZE = 64


def _trained_looking(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights plus non-trivial BatchNorm statistics, so a lost buffer would show."""
    model.train()
    with torch.no_grad():
        model(torch.rand(4, 3, SIZE, SIZE))
    return model.eval()


@pytest.mark.parametrize("cfg", [TINY_STUDENT, TINY_TEACHER], ids=["student", "teacher"])
def test_save_then_load_predictor_gives_identical_logits(tmp_path, cfg, speckle_image):
    torch.manual_seed(0)
    model = _trained_looking(build_model(cfg, SIZE))
    preprocess = PreprocessConfig(input_size=SIZE)
    weights = save_checkpoint(tmp_path / "m", model, CheckpointMeta(cfg, preprocess, CLASS_NAMES, role="x"))
    assert weights == tmp_path / "m.safetensors" and (tmp_path / "m.json").is_file()

    predictor = load_predictor(weights)  # rebuilt from the two files alone
    assert not predictor.model.training
    assert predictor.class_names == CLASS_NAMES
    x = torch.rand(3, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(predictor.model(x), model(x))
    for key, value in model.state_dict().items():
        assert torch.equal(predictor.model.state_dict()[key], value), key
    # Preprocessing travels with the checkpoint.
    assert predictor.preprocess.cfg == preprocess
    batch = predictor.preprocess(speckle_image).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(predictor.logits_for([speckle_image]), model(batch))
    prediction = predictor.predict(speckle_image)
    assert prediction.label in CLASS_NAMES
    assert sum(prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-5)


def test_config_describes_the_model(tmp_path):
    model = build_model(TINY_STUDENT, SIZE).eval()
    save_checkpoint(tmp_path / "m", model, CheckpointMeta(TINY_STUDENT, OFFLINE.student_preprocess, CLASS_NAMES))
    config = json.loads((tmp_path / "m.json").read_text())
    assert config["model_args"]["cnn_name"] == "mobilenetv3_small_050"
    assert config["class_names"] == list(CLASS_NAMES)
    assert config["preprocess"]["mean"] == list(OFFLINE.student_preprocess.mean)
    assert len(config["weights_sha256"]) == 64 and config["weights_file"] == "m.safetensors"
    # Any of stem, .safetensors or .json names the same checkpoint.
    assert checkpoint_paths(tmp_path / "m") == checkpoint_paths(tmp_path / "m.json")


def test_fp16_storage_loads_as_fp32(tmp_path):
    torch.manual_seed(0)
    model = _trained_looking(build_model(TINY_STUDENT, SIZE))
    save_checkpoint(
        tmp_path / "h", model, CheckpointMeta(TINY_STUDENT, PreprocessConfig(input_size=SIZE), CLASS_NAMES), half=True
    )
    full = save_checkpoint(
        tmp_path / "f", model, CheckpointMeta(TINY_STUDENT, PreprocessConfig(input_size=SIZE), CLASS_NAMES)
    )
    with safe_open(str(tmp_path / "h.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert torch.float16 in dtypes and torch.float32 not in dtypes
    assert (tmp_path / "h.safetensors").stat().st_size < 0.6 * full.stat().st_size

    loaded, _ = load_checkpoint(tmp_path / "h")
    for key, value in loaded.state_dict().items():
        if value.is_floating_point():
            assert value.dtype == torch.float32, key
            assert torch.equal(value, model.state_dict()[key].half().float()), key
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=0.05)


@pytest.fixture()
def saved(tmp_path):
    model = build_model(TINY_STUDENT, SIZE).eval()
    return save_checkpoint(
        tmp_path / "m", model, CheckpointMeta(TINY_STUDENT, PreprocessConfig(input_size=SIZE), CLASS_NAMES)
    )


def test_tampered_weights_are_refused_by_sha256(saved):
    data = bytearray(saved.read_bytes())
    data[-100] ^= 0x01  # one bit of one weight
    saved.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_predictor(saved)


def test_weights_from_another_checkpoint_are_refused(saved, tmp_path):
    other = save_checkpoint(
        tmp_path / "other",
        build_model(TINY_STUDENT, SIZE),
        CheckpointMeta(TINY_STUDENT, PreprocessConfig(input_size=SIZE), CLASS_NAMES),
    )
    saved.write_bytes(other.read_bytes())
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(saved)


@pytest.mark.parametrize(
    "text",
    ['{"name": "resnet50", "weights": "x.bin"}', "[1, 2, 3]", "not json at all {", ""],
    ids=["foreign-dict", "list", "garbage", "empty"],
)
def test_json_that_is_not_ours_is_refused(saved, text):
    saved.with_suffix(".json").write_text(text)
    with pytest.raises(CheckpointError):
        load_predictor(saved)


def test_missing_files_are_reported(saved):
    saved.unlink()
    with pytest.raises(CheckpointError, match="not found"):
        load_predictor(saved)
    with pytest.raises(CheckpointError, match="not found"):
        load_predictor(saved.parent / "nothing_here")


def test_weights_that_do_not_fit_the_config_are_a_checkpoint_error(saved):
    config = json.loads(saved.with_suffix(".json").read_text())
    config["model_args"]["cnn_name"] = "mobilenetv3_small_100"  # a different architecture
    saved.with_suffix(".json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        load_predictor(saved)


class _Payload:
    """Unpickling this object creates a file: the stand-in for arbitrary code execution."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_read_state_dict_never_unpickles_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"conv.weight": torch.zeros(1), "x": _Payload(str(marker))}, evil)
    with pytest.raises(WeightsError, match="refused"):
        read_state_dict(evil)
    assert not marker.exists()
    # Control: the payload is live, plain pickle would have run it.
    with open(evil, "rb") as f:
        try:
            torch.load(f, weights_only=False)
        except Exception:
            pass
    assert marker.exists()


def test_raw_pickle_file_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "weights.pth"
    evil.write_bytes(pickle.dumps({"w": _Payload(str(marker))}))
    with pytest.raises(WeightsError):
        read_state_dict(evil)
    assert not marker.exists()


def test_plain_tensor_files_are_accepted(tmp_path):
    state = {"a": torch.arange(4.0), "b": torch.ones(2, 2)}
    torch.save(state, tmp_path / "w.pt")
    torch.save({"state_dict": state}, tmp_path / "wrapped.pth")
    for name in ("w.pt", "wrapped.pth"):
        loaded = read_state_dict(tmp_path / name)
        assert set(loaded) == {"a", "b"} and torch.equal(loaded["a"], state["a"])
    with pytest.raises(WeightsError, match="not found"):
        read_state_dict(tmp_path / "missing.safetensors")


def test_predictor_applies_the_calibrated_temperature(saved):
    config_path = saved.with_suffix(".json")
    config = json.loads(config_path.read_text())
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    plain = load_predictor(saved).probabilities(logits)
    config["calibration"] = {"temperature": 2.0}
    config_path.write_text(json.dumps(config))
    calibrated = load_predictor(saved).probabilities(logits)
    assert torch.allclose(calibrated, torch.softmax(logits / 2.0, -1))
    assert calibrated.max() < plain.max()
    assert np.isclose(calibrated.sum().item(), 1.0)


def test_architecture_names_an_ensemble_by_its_networks_only():
    ensemble = ModelConfig(kind="ensemble", cnn_name="a", ensemble_members=("b",), global_branch="feature_transformer")
    hybrid = replace(ensemble, kind="teacher", ensemble_members=())
    assert CheckpointMeta(ensemble, PreprocessConfig(), CLASS_NAMES).architecture == "ensemble of a + b"
    assert CheckpointMeta(hybrid, PreprocessConfig(), CLASS_NAMES).architecture == "feature_transformer + a"


def _record(tmp_path, name: str, balanced_accuracies: list[float]) -> CheckpointMeta:
    """A fixed-schedule (keep=last) run's record: the saved weights are the last epoch's."""
    history = tuple(
        {"epoch": i + 1, "val_balanced_accuracy": b, "val_loss": 1.0 - b} for i, b in enumerate(balanced_accuracies)
    )
    meta = CheckpointMeta(
        TINY_STUDENT, PreprocessConfig(input_size=SIZE), CLASS_NAMES,
        best_epoch=len(history), validation=dict(history[-1]), history=history,
    )  # fmt: skip
    write_record(tmp_path / name, meta)
    return meta


def test_selection_scores_the_saved_weights_not_the_schedules_best_epoch(tmp_path):
    # Run a peaked at epoch 2 but its saved (last-epoch) weights score 0.60; run b ends at 0.70.
    peaked = _record(tmp_path, "a", [0.5, 0.9, 0.6])
    steady = _record(tmp_path, "b", [0.5, 0.6, 0.7])
    assert peaked.selection_score() == pytest.approx((0.6, -0.4))
    assert best_by_validation([tmp_path / "a", tmp_path / "b"]) == tmp_path / "b"
    # Within an epoch budget (teachers of different lengths), the best epoch inside it counts.
    assert peaked.selection_score(within_epochs=2) == pytest.approx((0.9, -0.1))
    assert steady.selection_score(within_epochs=1) == pytest.approx((0.5, -0.5))
