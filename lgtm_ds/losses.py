"""Distillation losses in PyTorch, and the LGTM teacher logit-gradient (cheap exact form).

Conventions (lgtm-method.md): ``KL_T(p || q)`` is the mean over rows of
``sum_c p_c (log p_c - log q_c)`` with both distributions ``softmax(logits / T)``; no T^2 factor
unless ``scale_by_t2``. The fused Triton versions live in ``lgtm_kernels``; these are the
reference path that every engine and test uses on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_per_row(logits: torch.Tensor, target_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row ``KL(softmax(target/T) || softmax(logits/T))``; gradient flows to ``logits`` only.

    Math in fp32 (or fp64 for fp64 inputs). Shapes [N, C] -> [N].
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    log_q = F.log_softmax(logits.to(dtype) / temperature, dim=-1)
    log_p = F.log_softmax(target_logits.detach().to(dtype) / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _t2(temperature: float, scale_by_t2: bool) -> float:
    return temperature**2 if scale_by_t2 else 1.0


def ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy; labels < 0 (e.g. -100) are ignored."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return F.cross_entropy(logits.to(dtype), labels, ignore_index=-100)


def student_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    scale_by_t2: bool = False,
) -> torch.Tensor:
    """``L_s = a_s KL_T(p_teacher || p_student) + (1 - a_s) CE(y, p_student)``."""
    loss = student_logits.new_zeros((), dtype=torch.promote_types(student_logits.dtype, torch.float32))
    if alpha > 0:
        kd = kd_per_row(student_logits, teacher_logits, temperature).mean()
        loss = loss + alpha * _t2(temperature, scale_by_t2) * kd
    if alpha < 1:
        loss = loss + (1 - alpha) * ce_loss(student_logits, labels)
    return loss


def teacher_loss(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    scale_by_t2: bool = False,
) -> torch.Tensor:
    """``L_t = a_t KL_T(p_student || p_teacher) + (1 - a_t) CE(y, p_teacher)``.

    The teacher's distillation term treats the *student's* prediction as the target.
    """
    return student_loss(
        teacher_logits, student_logits, labels, alpha=alpha, temperature=temperature, scale_by_t2=scale_by_t2
    )


def lgtm_teacher_logit_grad(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    student_logits_plus: torch.Tensor,
    student_logits_minus: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha_teacher: float,
    temperature: float,
    eta: float,
    radius: float,
    scale_by_t2: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dL/dz of the LGTM teacher objective, and the per-row distillation influence.

    ``dL/dz = a_t (softmax(z/T) - q) / (T n) + (1 - a_t)(softmax(z) - onehot(y)) / n
              + eta a_t (q+ - q-) / (2 R T n)``
    with ``q`` (``q+``, ``q-``) the student probabilities at theta (theta +- R v). Feeding this
    into one teacher backward equals ``grad_phi L_t(theta) - eta * h`` of the reference form.
    Influence ``I_i = -eta (l_i(+) - l_i(-)) / (2R)``, ``l_i`` the student's per-row KD loss.
    Rows whose label is < 0 drop their CE term (``n`` still counts every row, as the mean does).
    Returns (dL/dz in fp32/fp64 [N, C], influence [N]).
    """
    dtype = torch.promote_types(teacher_logits.dtype, torch.float32)
    T = float(temperature)
    z = teacher_logits.detach().to(dtype)
    n = z.shape[0]
    t2 = _t2(T, scale_by_t2)
    p_t = torch.softmax(z / T, dim=-1)
    q = torch.softmax(student_logits.detach().to(dtype) / T, dim=-1)
    q_plus = torch.softmax(student_logits_plus.detach().to(dtype) / T, dim=-1)
    q_minus = torch.softmax(student_logits_minus.detach().to(dtype) / T, dim=-1)
    grad = alpha_teacher * t2 * (p_t - q) / (T * n)
    if alpha_teacher < 1:
        valid = labels >= 0
        p1 = torch.softmax(z, dim=-1)
        onehot = F.one_hot(labels.clamp_min(0), z.shape[-1]).to(dtype)
        n_valid = max(int(valid.sum()), 1)  # note: host sync, n is tiny
        grad = grad + (1 - alpha_teacher) * (p1 - onehot) * valid[:, None] / n_valid
    grad = grad + eta * alpha_teacher * t2 * (q_plus - q_minus) / (2 * radius * T * n)
    l_plus = kd_per_row(student_logits_plus.detach(), z, T)
    l_minus = kd_per_row(student_logits_minus.detach(), z, T)
    influence = -eta * t2 * (l_plus - l_minus) / (2 * radius)
    return grad, influence
