"""Knowledge-distillation losses (logits; where the network looks) and a distiller whose
forward returns a dict of losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdcore.models import set_train_mode


def kd_kl_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kd_temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(z_t/T) || softmax(z_s/T)), averaged over the batch (``batchmean``)."""
    log_p_student = F.log_softmax(student_logits / kd_temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / kd_temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kd_temperature**2 * kl


def attention_map(feature_map: torch.Tensor, side: int) -> torch.Tensor:
    """(B, K, H, W) -> (B, side*side): where a network looks (Zagoruyko & Komodakis, ICLR 2017):
    the channel mean of squared activations, pooled to ``side`` x ``side``, L2-normalised."""
    energy = F.adaptive_avg_pool2d(feature_map.pow(2).mean(dim=1, keepdim=True), side).flatten(1)
    return F.normalize(energy, dim=1)


def attention_transfer_term(student_map: torch.Tensor, teacher_attention: torch.Tensor) -> torch.Tensor:
    """Squared L2 distance between the student's and the teacher's unit attention vectors, batch mean."""
    side = int(round(teacher_attention.shape[1] ** 0.5))
    return (attention_map(student_map, side) - teacher_attention).pow(2).sum(dim=1).mean()


def lesion_focus_term(feature_map: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """-log of the share of the attention energy inside the lesion, mean over the images that
    have a lesion (0 if none has): pulls where the network looks onto the annotated lesion."""
    energy = feature_map.pow(2).mean(dim=1, keepdim=True)
    share = energy / energy.sum(dim=(2, 3), keepdim=True).clamp_min(1e-12)
    inside = (F.adaptive_max_pool2d(masks.float(), energy.shape[2:]) > 0).float()
    has_lesion = inside.sum(dim=(1, 2, 3)) > 0
    if not has_lesion.any():
        return feature_map.sum() * 0.0
    return -(share * inside).sum(dim=(1, 2, 3))[has_lesion].clamp_min(1e-6).log().mean()


def feature_matching_term(projected: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the student's projected features and the teacher's
    standardised ones (unit variance per feature, so about 1 for an uninformed student)."""
    return F.mse_loss(projected, teacher_features)


def pre_logit_width(model: nn.Module) -> int:
    """Width of a timm classifier's pre-logit features (``forward_head(..., pre_logits=True)``)."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    targets: torch.Tensor,
    alpha: float = 0.5,
    kd_temperature: float = 4.0,
    class_weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> dict[str, torch.Tensor]:
    """L = alpha*CE + (1-alpha)*T^2*KL; without teacher logits it is plain CE.

    ``targets`` are class indices or class probabilities (mixup views). Returns
    ``{"loss", "ce", "kd"}`` (``kd`` is 0 without a teacher).
    """
    ce = F.cross_entropy(student_logits, targets, weight=class_weights, label_smoothing=label_smoothing)
    if teacher_logits is None:
        return {"loss": ce, "ce": ce.detach(), "kd": torch.zeros(())}
    kd = kd_kl_term(student_logits, teacher_logits, kd_temperature)
    return {"loss": alpha * ce + (1 - alpha) * kd, "ce": ce.detach(), "kd": kd.detach()}


class Distiller(nn.Module):
    """Student + frozen teacher. ``train()`` never wakes the teacher (BN and Dropout stay off).

    ``forward(images, targets, teacher_logits=None, teacher_attention=None, ...)`` uses cached
    teacher outputs when given (exact for fixed augmented views), otherwise runs the teacher
    under ``no_grad``. With ``attention_weight`` > 0 and teacher attention maps, the student
    also learns where the teacher looks (``loss += weight * at``); with ``mask_weight`` > 0 and
    lesion masks, its attention is pulled into the lesions (``loss += mask_weight * mask``); with
    ``feature_weight`` > 0 and a ``teacher_feature_width``, a linear ``projector`` (trained with
    the student, not part of it) maps the student's pre-logit features onto the teacher's
    standardised pooled features (``loss += feature_weight * feature``; FitNets-style feature
    KD: thousands of numbers per view to match instead of three).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        alpha: float,
        kd_temperature: float,
        class_weights: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
        freeze_batchnorm: bool = False,
        attention_weight: float = 0.0,
        mask_weight: float = 0.0,
        feature_weight: float = 0.0,
        teacher_feature_width: int = 0,
    ) -> None:
        super().__init__()
        self.freeze_batchnorm = freeze_batchnorm
        self.attention_weight = attention_weight
        self.mask_weight = mask_weight
        self.feature_weight = feature_weight
        use_features = feature_weight > 0 and teacher_feature_width > 0
        self.projector = nn.Linear(pre_logit_width(student), teacher_feature_width) if use_features else None
        self.student = student
        self.teacher = teacher
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        self.alpha = alpha
        self.kd_temperature = kd_temperature
        self.label_smoothing = label_smoothing
        self.register_buffer("class_weights", class_weights, persistent=False)

    def train(self, mode: bool = True) -> Distiller:
        self.training = mode
        set_train_mode(self.student, mode, self.freeze_batchnorm)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
        teacher_attention: torch.Tensor | None = None,
        lesion_masks: torch.Tensor | None = None,
        teacher_features: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        feature_map = self.student.forward_features(images)
        logits = self.student.forward_head(feature_map)
        if teacher_logits is None and self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(images)
        losses = kd_loss(
            logits, teacher_logits, targets, self.alpha, self.kd_temperature, self.class_weights, self.label_smoothing
        )
        if self.attention_weight > 0 and teacher_attention is not None:
            at = attention_transfer_term(feature_map, teacher_attention)
            losses = {**losses, "loss": losses["loss"] + self.attention_weight * at, "at": at.detach()}
        if self.mask_weight > 0 and lesion_masks is not None:
            focus = lesion_focus_term(feature_map, lesion_masks)
            losses = {**losses, "loss": losses["loss"] + self.mask_weight * focus, "mask": focus.detach()}
        if self.projector is not None and teacher_features is not None:
            projected = self.projector(self.student.forward_head(feature_map, pre_logits=True))
            matched = feature_matching_term(projected, teacher_features)
            losses = {**losses, "loss": losses["loss"] + self.feature_weight * matched, "feature": matched.detach()}
        return {"at": torch.zeros(()), "mask": torch.zeros(()), "feature": torch.zeros(()), **losses}
