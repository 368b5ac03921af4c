"""Knowledge-distillation loss and a distiller whose forward returns a dict of losses."""

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

    Returns ``{"loss", "ce", "kd"}`` (``kd`` is 0 without a teacher).
    """
    ce = F.cross_entropy(student_logits, targets, weight=class_weights, label_smoothing=label_smoothing)
    if teacher_logits is None:
        return {"loss": ce, "ce": ce.detach(), "kd": torch.zeros(())}
    kd = kd_kl_term(student_logits, teacher_logits, kd_temperature)
    return {"loss": alpha * ce + (1 - alpha) * kd, "ce": ce.detach(), "kd": kd.detach()}


class Distiller(nn.Module):
    """Student + frozen teacher. ``train()`` never wakes the teacher (BN and Dropout stay off).

    ``forward(images, targets, teacher_logits=None)`` uses cached teacher logits when given
    (exact for fixed augmented views), otherwise runs the teacher under ``no_grad``.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        alpha: float,
        kd_temperature: float,
        class_weights: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
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
        set_train_mode(self.student, mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        logits = self.student(images)
        if teacher_logits is None and self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(images)
        return kd_loss(
            logits, teacher_logits, targets, self.alpha, self.kd_temperature, self.class_weights, self.label_smoothing
        )
