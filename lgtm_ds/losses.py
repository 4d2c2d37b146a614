"""Distillation losses in PyTorch, and the LGTM teacher logit-gradient (cheap exact form).

Conventions (lgtm-method.md): ``KL_T(p || q)`` is the mean over rows of
``sum_c p_c (log p_c - log q_c)`` with both distributions ``softmax(logits / T)``; no T^2 factor
unless ``scale_by_t2``. The KD divergence and the fused teacher logit-gradient come from
``lgtm_kernels`` (Triton on CUDA, its torch reference on CPU); this module composes them into
the student and teacher objectives. Rows whose label is < 0 get no CE term; every mean divides
by the number of rows.

Regression (one output, float labels, e.g. GLUE stsb): the KD divergence is the squared error
between the two predictions and the task loss is the squared error to the label (no
temperature); the cheap LGTM form carries over with ``softmax(z/T) - q`` replaced by ``2(z - s)``.
"""

from __future__ import annotations

import lgtm_kernels
import torch
import torch.nn.functional as F


def is_regression(logits: torch.Tensor) -> bool:
    """One output per row: a regression head (a softmax over one class carries no signal)."""
    return logits.shape[-1] == 1


def kd_per_row(
    logits: torch.Tensor, target_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Per-row ``KL(softmax(target/T) || softmax(logits/T))``; gradient flows to ``logits`` only.
    Regression: ``(logits - target)^2``.

    fp64 inputs take a float64 torch formula (the test oracle: the kernels compute in fp32);
    everything else goes through ``lgtm_kernels.kd_loss``. Shapes [N, C] -> [N].
    """
    if is_regression(logits):
        dtype = torch.promote_types(logits.dtype, torch.float32)
        return (logits.to(dtype) - target_logits.detach().to(dtype)).pow(2).sum(-1)
    if logits.dtype == torch.float64:
        log_q = F.log_softmax(logits / temperature, dim=-1)
        log_p = F.log_softmax(target_logits.detach().double() / temperature, dim=-1)
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    return lgtm_kernels.kd_loss(
        logits, target_logits.detach().to(logits.dtype), temperature=temperature, reduction="none"
    )


def _t2(temperature: float, scale_by_t2: bool) -> float:
    return temperature**2 if scale_by_t2 else 1.0


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over rows / number of rows; labels < 0 (e.g. -100) add nothing.
    Regression: mean squared error to the float labels."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    if is_regression(logits):
        return (logits.to(dtype).squeeze(-1) - labels.to(dtype)).pow(2).mean()
    ce = F.cross_entropy(logits.to(dtype), labels, ignore_index=-100, reduction="sum")
    return ce / max(labels.shape[0], 1)


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
    loss = student_logits.new_zeros(
        (), dtype=torch.promote_types(student_logits.dtype, torch.float32)
    )
    if alpha > 0:
        kd = kd_per_row(student_logits, teacher_logits, temperature).mean()
        t2 = 1.0 if is_regression(student_logits) else _t2(temperature, scale_by_t2)
        loss = loss + alpha * t2 * kd
    if alpha < 1:
        loss = loss + (1 - alpha) * task_loss(student_logits, labels)
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
        teacher_logits,
        student_logits,
        labels,
        alpha=alpha,
        temperature=temperature,
        scale_by_t2=scale_by_t2,
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
    One fused pass (``lgtm_kernels``). Returns (dL/dz in z's dtype [N, C], influence [N]).

    ``scale_by_t2`` multiplies both KD terms by T^2: the kernel's single ``alpha`` is rescaled to
    ``a' = a T^2 / s`` with ``s = a T^2 + 1 - a`` and its gradient multiplied by ``s`` (so the
    KD terms get ``a T^2``, the CE term ``1 - a``); the influence is multiplied by ``T^2``.
    """
    if is_regression(teacher_logits):
        return _regression_teacher_logit_grad(
            teacher_logits,
            student_logits,
            student_logits_plus,
            student_logits_minus,
            labels,
            alpha_teacher=alpha_teacher,
            eta=eta,
            radius=radius,
        )
    a, t2 = float(alpha_teacher), _t2(temperature, scale_by_t2)
    scale = a * t2 + (1 - a)
    grad, influence = lgtm_kernels.lgtm_teacher_logit_grad(
        teacher_logits.detach(),
        student_logits.detach(),
        student_logits_plus.detach(),
        student_logits_minus.detach(),
        labels,
        alpha_teacher=a * t2 / scale,
        temperature=temperature,
        eta=eta,
        radius=radius,
    )
    if scale != 1.0:
        grad = grad * scale
    if t2 != 1.0:
        influence = influence * t2
    return grad, influence


def influence_logit_term(
    student_logits_plus: torch.Tensor,
    student_logits_minus: torch.Tensor,
    *,
    alpha_teacher: float,
    temperature: float,
    eta: float,
    radius: float,
    scale_by_t2: bool = False,
) -> torch.Tensor:
    """The influence part of dL/dz alone: ``eta a_t (q+ - q-) / (2 R T n)`` (fp32).
    Regression: ``eta a_t 2 (s+ - s-) / (2 R n)``."""
    dtype = torch.promote_types(student_logits_plus.dtype, torch.float32)
    T = float(temperature)
    n = student_logits_plus.shape[0]
    if is_regression(student_logits_plus):
        diff = student_logits_plus.detach().to(dtype) - student_logits_minus.detach().to(dtype)
        return (eta * alpha_teacher / (radius * n)) * diff
    q_plus = torch.softmax(student_logits_plus.detach().to(dtype) / T, dim=-1)
    q_minus = torch.softmax(student_logits_minus.detach().to(dtype) / T, dim=-1)
    return (eta * alpha_teacher * _t2(T, scale_by_t2) / (2 * radius * T * n)) * (q_plus - q_minus)


def _regression_teacher_logit_grad(z, s, s_plus, s_minus, labels, *, alpha_teacher, eta, radius):
    """Regression form of :func:`lgtm_teacher_logit_grad` (MSE KD and task terms):
    ``dL/dz = 2 a_t (z - s)/n + 2 (1 - a_t)(z - y)/n + eta a_t 2 (s+ - s-)/(2 R n)``,
    ``I_i = -eta ((s+_i - z_i)^2 - (s-_i - z_i)^2) / (2R)``."""
    dtype = torch.promote_types(z.dtype, torch.float32)
    z, s, sp, sm = (x.detach().to(dtype) for x in (z, s, s_plus, s_minus))
    y = labels.to(dtype).reshape(z.shape)
    n, a = z.shape[0], float(alpha_teacher)
    grad = 2 * a * (z - s) / n + 2 * (1 - a) * (z - y) / n + eta * a * (sp - sm) / (radius * n)
    influence = -eta * ((sp - z).pow(2) - (sm - z).pow(2)).sum(-1) / (2 * radius)
    return grad, influence
