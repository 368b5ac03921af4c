"""The distillation loss, pinned against hand-computed numbers, and the frozen teacher."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_models import TINY_STUDENT, TINY_TEACHER

from kdcore.distill import Distiller, kd_kl_term, kd_loss, pre_logit_width
from kdcore.models import build_model, set_train_mode

# A 2-sample, 3-class example, worked out by hand below (T = 4, alpha = 0.5).
STUDENT = [[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]]
TEACHER = [[3.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
TARGETS = [2, 0]
#   p_t = softmax(z_t / 4) = [[0.48102, 0.29176, 0.22722], [0.30450, 0.30450, 0.39099]]
#   p_s = softmax(z_s / 4) = [[0.25428, 0.32650, 0.41923], [0.31824, 0.21872, 0.46304]]
#   KL_i = sum_c p_t log(p_t / p_s)       = [0.134659, 0.021194]
#   batchmean KL = (0.134659 + 0.021194) / 2 = 0.0779265;  T^2 * KL = 16 * 0.0779265 = 1.246824
#   CE_i = -log softmax(z_s)[y]          = [0.407606, 1.741311];  CE = 1.074459
#   L = 0.5 * 1.074459 + 0.5 * 1.246824 = 1.160641
HAND_KD = 1.246824
HAND_CE = 1.074459
HAND_LOSS = 1.160641


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _numpy_kd(student: np.ndarray, teacher: np.ndarray, temperature: float) -> float:
    """T^2 * mean_i sum_c p_t log(p_t / p_s), written independently of torch."""
    p_t, p_s = _softmax(teacher / temperature), _softmax(student / temperature)
    return float(temperature**2 * np.mean(np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=1)))


def test_kd_loss_matches_hand_computed_values():
    s, t, y = torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(TARGETS)
    losses = kd_loss(s, t, y, alpha=0.5, kd_temperature=4.0)
    assert losses["kd"].item() == pytest.approx(HAND_KD, abs=1e-5)
    assert losses["ce"].item() == pytest.approx(HAND_CE, abs=1e-5)
    assert losses["loss"].item() == pytest.approx(HAND_LOSS, abs=1e-5)
    # The same numbers from an independent numpy implementation of the formula.
    s_np, t_np = np.array(STUDENT), np.array(TEACHER)
    ce_np = float(np.mean(-np.log(_softmax(s_np)[[0, 1], TARGETS])))
    kd_np = _numpy_kd(s_np, t_np, 4.0)
    assert losses["kd"].item() == pytest.approx(kd_np, rel=1e-5)
    assert losses["loss"].item() == pytest.approx(0.5 * ce_np + 0.5 * kd_np, rel=1e-5)


def test_alpha_weights_ce_against_kd():
    s, t, y = torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(TARGETS)
    assert kd_loss(s, t, y, alpha=1.0)["loss"].item() == pytest.approx(HAND_CE, abs=1e-5)
    assert kd_loss(s, t, y, alpha=0.0)["loss"].item() == pytest.approx(HAND_KD, abs=1e-5)
    assert kd_loss(s, t, y, alpha=0.25)["loss"].item() == pytest.approx(0.25 * HAND_CE + 0.75 * HAND_KD, abs=1e-5)


def test_kl_is_batchmean_not_elementwise_mean():
    s, t = torch.tensor(STUDENT), torch.tensor(TEACHER)
    per_sample = [kd_kl_term(s[i : i + 1], t[i : i + 1], 4.0).item() for i in range(2)]
    batch = kd_kl_term(s, t, 4.0).item()
    assert batch == pytest.approx(np.mean(per_sample), rel=1e-6)  # sum over classes, mean over batch
    assert batch != pytest.approx(np.sum(per_sample) / 6, rel=1e-3)  # 'mean' would divide by B*C
    # Batch size does not change the scale: duplicating the batch leaves the value unchanged.
    assert kd_kl_term(torch.cat([s, s]), torch.cat([t, t]), 4.0).item() == pytest.approx(batch, rel=1e-6)


def test_kl_is_scaled_by_temperature_squared():
    s, t = torch.tensor(STUDENT), torch.tensor(TEACHER)
    # Scaling logits by T makes softmax(z/T) the same distribution as softmax(z) at T = 1,
    # so the only difference left is the T^2 factor.
    for temperature in (2.0, 4.0):
        scaled = kd_kl_term(s * temperature, t * temperature, temperature).item()
        assert scaled == pytest.approx(temperature**2 * kd_kl_term(s, t, 1.0).item(), rel=1e-5)


def test_identical_logits_give_zero_kd():
    s, y = torch.tensor(STUDENT), torch.tensor(TARGETS)
    losses = kd_loss(s, s.clone(), y)
    assert losses["kd"].item() == pytest.approx(0.0, abs=1e-7)
    assert losses["loss"].item() == pytest.approx(0.5 * HAND_CE, abs=1e-5)


def test_without_teacher_the_loss_is_plain_cross_entropy():
    s, y = torch.tensor(STUDENT, requires_grad=True), torch.tensor(TARGETS)
    losses = kd_loss(s, None, y, alpha=0.5, kd_temperature=4.0)
    assert losses["loss"].item() == pytest.approx(HAND_CE, abs=1e-5)
    assert losses["kd"].item() == 0.0
    weights = torch.tensor([2.0, 1.0, 0.5])
    weighted = kd_loss(s, None, y, class_weights=weights)["loss"]
    # Weighted CE: sum_i w_yi * nll_i / sum_i w_yi with nll = [0.407606, 1.741311], w = [0.5, 2.0].
    assert weighted.item() == pytest.approx((0.5 * 0.407606 + 2.0 * 1.741311) / 2.5, abs=1e-5)
    weighted.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


def test_kd_gradient_reaches_only_the_student():
    s = torch.tensor(STUDENT, requires_grad=True)
    t = torch.tensor(TEACHER, requires_grad=True)
    kd_loss(s, t.detach(), torch.tensor(TARGETS))["loss"].backward()
    # d(T^2 KL_batchmean)/dz_s = T (p_s - p_t) / B;  d(CE)/dz_s = (softmax(z_s) - onehot) / B
    expected = F.softmax(s.detach() / 4, 1) - F.softmax(t.detach() / 4, 1)
    assert t.grad is None
    ce_grad = (F.softmax(s.detach(), 1) - F.one_hot(torch.tensor(TARGETS), 3)) / 2
    assert torch.allclose(s.grad, 0.5 * ce_grad + 0.5 * 4 * expected / 2, atol=1e-6)


# ----------------------------------------------------------------------------- frozen teacher

SIZE = 64


def _tiny_teacher() -> torch.nn.Module:
    return build_model(TINY_TEACHER, SIZE)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _bn_buffers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> list[str]:
    after = module.state_dict()
    return [k for k, v in before.items() if not torch.equal(v, after[k])]


def test_distiller_train_step_leaves_teacher_weights_and_bn_stats_unchanged():
    torch.manual_seed(0)
    teacher = _tiny_teacher()
    teacher.train()  # as if handed over straight from its own training
    student = build_model(TINY_STUDENT, SIZE)
    distiller = Distiller(student, teacher, alpha=0.5, kd_temperature=4.0)
    distiller.train()
    assert distiller.training and student.training
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert all(not p.requires_grad for p in teacher.parameters())

    teacher_before, student_before = _state(teacher), _state(student)
    assert _bn_buffers(teacher_before), "the teacher must have BatchNorm buffers for this test to mean anything"
    optimizer = torch.optim.AdamW([p for p in distiller.parameters() if p.requires_grad], lr=1e-2)
    images, targets = torch.rand(6, 3, SIZE, SIZE), torch.tensor([0, 1, 2, 0, 1, 2])
    for _ in range(2):
        losses = distiller(images, targets)  # the teacher runs live here (no cached logits)
        assert losses["kd"].item() > 0
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()

    assert _changed(teacher_before, teacher) == []
    assert all(p.grad is None for p in teacher.parameters())
    # The step really trained the student, BatchNorm statistics included.
    student_changed = _changed(student_before, student)
    assert any(k.endswith("running_mean") for k in student_changed)
    assert any(k.endswith("weight") for k in student_changed)

    # Dropout inactive: the teacher's output is deterministic in distillation mode.
    with torch.no_grad():
        assert torch.equal(teacher(images), teacher(images))

    # Control: a teacher in train mode would have moved its BatchNorm statistics.
    teacher.train()
    with torch.no_grad():
        teacher(images)
    assert _changed(_bn_buffers(teacher_before), teacher)


def test_distiller_eval_then_train_keeps_teacher_in_eval():
    teacher = _tiny_teacher()
    student = build_model(TINY_STUDENT, SIZE)
    distiller = Distiller(student, teacher, alpha=0.5, kd_temperature=4.0)
    distiller.eval()
    assert not student.training
    distiller.train(True)
    assert student.training and not teacher.training


def test_cached_teacher_logits_are_used_instead_of_running_the_teacher():
    teacher = _tiny_teacher()
    student = build_model(TINY_STUDENT, SIZE)
    distiller = Distiller(student, teacher, alpha=0.5, kd_temperature=4.0).eval()
    images, targets = torch.rand(2, 3, SIZE, SIZE), torch.tensor([0, 2])
    cached = torch.tensor(TEACHER)
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    losses = distiller(images, targets, teacher_logits=cached)
    assert calls == []
    expected = kd_loss(student(images), cached, targets)
    assert losses["loss"].item() == pytest.approx(expected["loss"].item(), rel=1e-6)


def test_frozen_student_blocks_keep_weights_and_bn_stats():
    torch.manual_seed(0)
    student = build_model(replace(TINY_STUDENT, frozen_blocks=2), SIZE)
    frozen = student.frozen_modules
    assert frozen[0] is student.conv_stem and len(frozen) == 4  # stem, bn1, blocks 0 and 1
    frozen_names = {n for n, m in student.named_modules() if any(m is f for f in frozen)}
    distiller = Distiller(student, None, alpha=0.5, kd_temperature=4.0)
    distiller.train()
    assert all(not m.training for f in frozen for m in f.modules())
    assert student.blocks[2].training

    before = _state(student)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    images, targets = torch.rand(6, 3, SIZE, SIZE), torch.tensor([0, 1, 2, 0, 1, 2])
    for _ in range(2):
        losses = distiller(images, targets)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()

    changed = _changed(before, student)
    in_frozen = [k for k in changed if any(k == n or k.startswith(n + ".") for n in frozen_names)]
    assert in_frozen == []
    assert any(k.startswith("blocks.2.") and k.endswith("running_mean") for k in changed)

    set_train_mode(student, True)  # the engine's way of entering training keeps them frozen too
    assert not student.bn1.training and student.blocks[3].training


def test_attention_map_and_transfer_term_match_hand_computed_values():
    from kdcore.distill import attention_map, attention_transfer_term

    feature_map = torch.zeros(1, 2, 2, 2)
    feature_map[0, 0, 0, 0] = 1.0
    feature_map[0, 1, 0, 0], feature_map[0, 1, 1, 1] = 1.0, 2.0
    # channel mean of squares: [[1, 0], [0, 2]] -> unit vector [1, 0, 0, 2] / sqrt(5)
    expected = torch.tensor([[1.0, 0.0, 0.0, 2.0]]) / 5**0.5
    torch.testing.assert_close(attention_map(feature_map, side=2), expected)
    teacher = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    # (1/sqrt5 - 1)^2 + (2/sqrt5)^2 = 0.305573 + 0.8
    assert attention_transfer_term(feature_map, teacher).item() == pytest.approx(1.105573, abs=1e-5)
    assert attention_map(torch.rand(3, 8, 14, 14), side=7).shape == (3, 49)  # pooled to the teacher's side


def test_distiller_adds_weighted_attention_transfer_only_when_asked():
    torch.manual_seed(0)
    student = build_model(TINY_STUDENT, 64).eval()
    images, targets = torch.rand(2, 3, 64, 64), torch.tensor([0, 2])
    teacher_logits, teacher_attention = torch.randn(2, 3), F.normalize(torch.rand(2, 4), dim=1)
    plain = Distiller(student, None, 0.5, 4.0)(images, targets, teacher_logits, teacher_attention)
    guided = Distiller(student, None, 0.5, 4.0, attention_weight=3.0)(
        images, targets, teacher_logits, teacher_attention
    )
    assert plain["at"].item() == 0.0 and guided["at"].item() > 0
    assert guided["loss"].item() == pytest.approx(plain["loss"].item() + 3.0 * guided["at"].item(), rel=1e-5)


def test_distiller_adds_weighted_feature_matching_through_a_projector_only_when_asked():
    torch.manual_seed(0)
    student = build_model(TINY_STUDENT, 64).eval()
    images, targets, teacher_logits = torch.rand(2, 3, 64, 64), torch.tensor([0, 2]), torch.randn(2, 3)
    teacher_features = torch.randn(2, 10)
    plain = Distiller(student, None, 0.5, 4.0, teacher_feature_width=10)
    matched = Distiller(student, None, 0.5, 4.0, feature_weight=2.0, teacher_feature_width=10)
    assert plain.projector is None and matched.projector.in_features == pre_logit_width(student)
    assert matched.projector.out_features == 10 and "projector" not in dict(student.named_children())
    plain_losses = plain(images, targets, teacher_logits, teacher_features=teacher_features)
    losses = matched(images, targets, teacher_logits, teacher_features=teacher_features)
    projected = matched.projector(student.forward_head(student.forward_features(images), pre_logits=True))
    assert plain_losses["feature"].item() == 0.0
    assert losses["feature"].item() == pytest.approx(F.mse_loss(projected, teacher_features).item(), rel=1e-5)
    expected = plain_losses["loss"].item() + 2.0 * losses["feature"].item()
    assert losses["loss"].item() == pytest.approx(expected, rel=1e-5)
    losses["loss"].backward()
    assert matched.projector.weight.grad.abs().sum() > 0  # the projector learns with the student


def test_lesion_focus_term_matches_hand_computed_values():
    from kdcore.distill import lesion_focus_term

    feature_map = torch.zeros(2, 1, 2, 2)
    feature_map[:, 0, 0, 0], feature_map[:, 0, 1, 1] = 1.0, 3.0  # energy 1 and 9: 10% and 90%
    masks = torch.zeros(2, 1, 4, 4)
    masks[0, 0, :2, :2] = 1  # image 0: lesion where 10% of the energy is
    # image 1 has no lesion: it does not count
    assert lesion_focus_term(feature_map, masks).item() == pytest.approx(-np.log(0.1), abs=1e-5)
    masks[1, 0, 2:, 2:] = 1  # image 1: lesion on the 90%
    assert lesion_focus_term(feature_map, masks).item() == pytest.approx(-(np.log(0.1) + np.log(0.9)) / 2, abs=1e-5)
    assert lesion_focus_term(feature_map, torch.zeros(2, 1, 4, 4)).item() == 0.0
