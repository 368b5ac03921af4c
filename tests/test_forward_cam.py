"""Grad-CAM in the forward pass equals pytorch-grad-cam's GradCAM on real BUSI images."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from kdcore.cam import ForwardGradCam, UnsupportedHeadError, gap_head_layers
from kdcore.checkpoint import load_checkpoint
from kdcore.config import DEFAULT_SPLIT_FILE, PreprocessConfig
from kdcore.data import read_split_file
from kdcore.imaging import read_grey_image
from kdcore.models import cam_target_layer
from kdcore.transforms import Preprocess


def busi_test_images(busi_dir, per_class: int = 1) -> list[np.ndarray]:
    records = [r for r in read_split_file(DEFAULT_SPLIT_FILE) if r.split == "test"]
    chosen = [
        r for label in ("benign", "malignant", "normal") for r in [x for x in records if x.label == label][:per_class]
    ]
    return [read_grey_image(busi_dir / r.file) for r in chosen]


def reference_grad_cam(model: torch.nn.Module, batch: torch.Tensor, class_index: int) -> np.ndarray:
    with GradCAM(model=model, target_layers=[cam_target_layer(model)]) as cam:
        return cam(input_tensor=batch, targets=[ClassifierOutputTarget(class_index)])[0]


@pytest.mark.parametrize("model_name", ["mobilenetv3_small_100", "tf_efficientnet_lite0"])
def test_forward_cam_equals_pytorch_grad_cam_on_busi(busi_dir, model_name):
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=3).eval()
    forward_cam = ForwardGradCam(model)
    preprocess = Preprocess(PreprocessConfig())
    for grey in busi_test_images(busi_dir):
        batch = preprocess(grey).unsqueeze(0)
        with torch.inference_mode():
            logits, cam = forward_cam(batch)
        expected = reference_grad_cam(model, batch, int(logits.argmax()))
        assert cam.shape == (1, 224, 224)
        assert np.abs(cam[0].numpy() - expected).max() <= 1e-3
        with torch.inference_mode():
            torch.testing.assert_close(logits, model(batch))


@pytest.mark.parametrize("model_name", ["mobilenetv3_small_100", "tf_efficientnet_lite0"])
def test_channel_weights_equal_autograd_gradients(model_name):
    torch.manual_seed(1)
    model = timm.create_model(model_name, num_classes=3).eval()
    features = model.forward_features(torch.randn(2, 3, 224, 224)).detach().requires_grad_(True)
    logits, weights = ForwardGradCam(model).logits_and_channel_weights(features.detach())
    chosen = model.forward_head(features).gather(1, logits.argmax(1, keepdim=True))
    (gradient,) = torch.autograd.grad(chosen.sum(), features)
    torch.testing.assert_close(weights, gradient[:, :, 3, 3], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(gradient, gradient[:, :, :1, :1].expand_as(gradient))


def test_hybrid_teacher_has_no_forward_cam(tiny_checkpoints):
    teacher, _ = load_checkpoint(tiny_checkpoints["teacher"])
    with pytest.raises(UnsupportedHeadError):
        gap_head_layers(teacher)
