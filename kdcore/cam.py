"""Grad-CAM, two ways: inside the forward pass for GAP-first classifiers (exportable to ONNX,
used for the student everywhere), and pytorch-grad-cam's hooks + backward pass (the
reference in tests, and the teacher's CAM).

Forward pass: after the pooling, the logits depend on the last feature map A (K x H x W)
only through its spatial mean, so d logit_c / d A[k, i, j] = (d logit_c / d pooled[k]) / (H * W)
at every position. Grad-CAM's channel weights are therefore the pooled-vector gradient divided
by H * W, and that gradient is a product of the head's (tiny) Jacobians: no backward pass, no
hooks. The map is post-processed exactly as pytorch-grad-cam does it: ReLU, min-max, bilinear
upsampling to the input size, min-max again.

pytorch-grad-cam registers hooks on the model and is not thread-safe, so each call builds its
own ``GradCAM`` inside a context manager (hooks released on exit) while holding the
predictor's lock.
"""

from __future__ import annotations

import threading
from weakref import WeakKeyDictionary

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from timm.layers import SelectAdaptivePool2d
from timm.models.efficientnet import EfficientNet
from timm.models.mobilenetv3 import MobileNetV3
from torch import nn

from kdcore.inference import Prediction, Predictor
from kdcore.models import cam_target_layer
from kdcore.transforms import Preprocess

NORMALISE_EPS = 1e-7  # pytorch-grad-cam's scale_cam_image epsilon

ACTIVATION_DERIVATIVES = {
    nn.Identity: lambda x: torch.ones_like(x),
    nn.Flatten: lambda x: torch.ones_like(x),
    nn.ReLU: lambda x: (x > 0).to(x.dtype),
    # Same piecewise form as torch's hardswish_backward.
    nn.Hardswish: lambda x: torch.where(x < -3, 0.0, torch.where(x <= 3, x / 3 + 0.5, 1.0)),
}


class UnsupportedHeadError(TypeError):
    """The model's head does not start with global average pooling over the CAM layer."""


def gap_head_layers(model: nn.Module) -> list[nn.Module]:
    """The layers applied after global average pooling, in order; raise if not GAP-first.

    MobileNetV3 pools *before* its 1x1 ``conv_head``; EfficientNet pools after ``bn2``. In both,
    ``forward_features`` ends at ``kdcore.models.cam_target_layer``.
    """
    if isinstance(model, MobileNetV3):
        layers = [model.conv_head, model.norm_head, model.act2, model.flatten, model.classifier]
    elif isinstance(model, EfficientNet):
        layers = [model.classifier]
    else:
        raise UnsupportedHeadError(f"{type(model).__name__}: no global-average-pool-first head known")
    pool = model.global_pool
    if not isinstance(pool, SelectAdaptivePool2d) or pool.pool_type != "avg":
        raise UnsupportedHeadError(f"{type(model).__name__}: head pooling is not a global average")
    for layer in layers:
        if not (isinstance(layer, nn.Linear) or _is_pointwise_conv(layer) or type(layer) in ACTIVATION_DERIVATIVES):
            raise UnsupportedHeadError(f"{type(model).__name__}: head layer {type(layer).__name__} not supported")
    return layers


def supports_forward_cam(model: nn.Module) -> bool:
    try:
        gap_head_layers(model)
    except UnsupportedHeadError:
        return False
    return True


def _is_pointwise_conv(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1) and layer.groups == 1


def _input_gradient(layer: nn.Module, layer_input: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """Vector-Jacobian product of one head layer; gradients are (B, features) vectors."""
    # Both products reuse the layer's own weight tensor, so an exported graph stores it once.
    if isinstance(layer, nn.Linear):
        return grad_output @ layer.weight
    if isinstance(layer, nn.Conv2d):
        return F.conv_transpose2d(grad_output[:, :, None, None], layer.weight).flatten(1)
    return grad_output * ACTIVATION_DERIVATIVES[type(layer)](layer_input.flatten(1))


def min_max_normalise(maps: torch.Tensor) -> torch.Tensor:
    """(B, H, W) -> per map ``(x - min) / (eps + max(x - min))``, as pytorch-grad-cam."""
    shifted = maps - maps.amin(dim=(1, 2), keepdim=True)
    return shifted / (NORMALISE_EPS + shifted.amax(dim=(1, 2), keepdim=True))


class ForwardGradCam(nn.Module):
    """``x -> (logits, cam)``: Grad-CAM of the predicted class, ``cam`` (B, H_in, W_in) in [0, 1]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.head_layers = gap_head_layers(model)
        self.model = model.eval()

    def logits_and_channel_weights(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and Grad-CAM weights (B, K): d logit_c / d features[k, i, j], equal at every (i, j)."""
        hidden = self.model.global_pool(features)
        layer_inputs = []
        for layer in self.head_layers:
            layer_inputs.append(hidden)
            hidden = layer(hidden.clone())  # timm activations are in-place; keep the input intact
        logits = hidden
        grad = F.one_hot(logits.argmax(dim=1), logits.shape[1]).to(logits.dtype)
        for layer, layer_input in zip(reversed(self.head_layers), reversed(layer_inputs)):
            grad = _input_gradient(layer, layer_input, grad)
        return logits, grad / (features.shape[2] * features.shape[3])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.forward_features(x)
        logits, weights = self.logits_and_channel_weights(features)
        cam = F.relu(torch.einsum("bk,bkhw->bhw", weights, features))
        upsampled = F.interpolate(
            min_max_normalise(cam).unsqueeze(1), size=x.shape[2:], mode="bilinear", align_corners=False
        )
        return logits, min_max_normalise(upsampled.squeeze(1))


class ResizedGreyCam(nn.Module):
    """``(B, 1, S, S)`` uint8 resized grey -> (logits, cam): THE normalisation, then ``ForwardGradCam``.

    Input is ``Preprocess.resize``'s output, so an exported graph needs no float work outside.
    """

    def __init__(self, model: nn.Module, preprocess: Preprocess) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.cam = ForwardGradCam(model)

    def forward(self, small: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cam(self.preprocess.normalize(small))


_LOCKS: WeakKeyDictionary[Predictor, threading.Lock] = WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _lock_for(predictor: Predictor) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(predictor, threading.Lock())


def grad_cam(predictor: Predictor, grey: np.ndarray, class_index: int | None = None) -> tuple[Prediction, np.ndarray]:
    """Prediction and an (S, S) Grad-CAM map in [0, 1] for the predicted (or given) class.

    The prediction's latency is the plain forward pass, measured separately from the CAM.
    The plain forward pass also runs under the lock: while GradCAM's hooks are registered,
    any other forward pass through the model would overwrite the captured activations.
    """
    # The input asks for gradients so that a frozen backbone's maps still carry a graph.
    batch = predictor.preprocess(grey).unsqueeze(0).requires_grad_(True)
    with _lock_for(predictor):
        prediction = predictor.predict(grey)
        if class_index is None:
            class_index = predictor.class_names.index(prediction.label)
        target_layers = [cam_target_layer(predictor.model)]
        with torch.enable_grad(), GradCAM(model=predictor.model, target_layers=target_layers) as cam:
            heatmap = cam(input_tensor=batch, targets=[ClassifierOutputTarget(class_index)])[0]
    return prediction, heatmap.astype(np.float32)
