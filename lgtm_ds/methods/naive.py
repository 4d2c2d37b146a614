"""The LGTM reference form, kept out of the production path: a test oracle and a benchmark
baseline.

It does what the public reference implementation does (docs/algorithm.md, "One LGTM step"):
deep-copies the student and its optimizer to take a real look-ahead step, and runs the teacher
backward three times (at ``theta``, ``theta + R v`` and ``theta - R v``), holding three
teacher-sized gradient lists. Plain modules and torch optimizers only. Its hyper-parameters are
the experiment's ``method`` section, with the same defaults as the ``Distiller``
(:func:`~lgtm_ds.methods.config.method_config`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..engines.base import get_logits, model_inputs
from ..tasks import Task, get_task
from .config import MethodSection, method_config


def naive_lgtm_step(
    teacher: nn.Module,
    student: nn.Module,
    teacher_opt: torch.optim.Optimizer,
    student_opt: torch.optim.Optimizer,
    batch: dict,
    quiz_batch: dict,
    *,
    config: MethodSection | None = None,
    student_step: bool = True,
    task: Task | str = "classification",
    gold_batch: dict | None = None,
    **hparams,
) -> dict:
    """One LGTM step in the reference form. Returns the teacher gradient ``G``, the losses and
    the per-example influence ``-eta (l(theta + R v) - l(theta - R v)) / (2R)`` (``l``: the
    student's KD loss per example, summed over its tokens for causal LMs). ``config`` and
    ``hparams``: the ``method`` section, as for the ``Distiller``.

    ``gold_batch``: the on-policy form (docs/on-policy.md). ``batch`` then holds sampled
    completions and ``gold_batch`` the data set's completions of the same prompts: the student's
    loss on ``batch`` is the KD term alone, the teacher's ``a_t KD`` on ``batch`` plus
    ``(1 - a_t) CE`` on ``gold_batch`` (which does not depend on theta: it enters ``G`` once)."""
    c = method_config("lgtm", config, **hparams)
    task = get_task(task)() if isinstance(task, str) else task
    alpha_student, alpha_teacher, temperature = c.alpha_student, c.alpha_teacher, c.temperature
    kd_scale = 1.0
    if gold_batch is not None:  # a sampled step: KD alone on it, the teacher's CE on the gold rows
        alpha_student, kd_scale, alpha_teacher = 1.0, alpha_teacher, 1.0
    kw = dict(temperature=temperature, scale_by_t2=c.scale_by_t2)
    kw_s, kw_t = dict(kw, beta=c.jsd_beta), dict(kw, beta=c.teacher_beta)
    x, y = model_inputs(batch), batch["labels"]
    teacher.train()
    student.train()
    t_params = [p for p in teacher.parameters() if p.requires_grad]
    s_params = [p for p in student.parameters() if p.requires_grad]

    # 1-2 (Eq. (3)). real look-ahead step on deep copies of the student and its optimizer.
    with torch.no_grad():
        t_logits = get_logits(teacher(**x))
    # one deepcopy of both keeps the optimizer pointing at the copied parameters
    s_copy, opt_copy = copy.deepcopy((student, student_opt))
    opt_copy.zero_grad(set_to_none=True)
    ls = task.distill_loss(get_logits(s_copy(**x)), t_logits, y, alpha=alpha_student, **kw_s)
    ls.backward()
    opt_copy.step()

    # 3-4 (Eq. (4), (5)). quiz gradient at theta', radius.
    opt_copy.zero_grad(set_to_none=True)
    ce = task.task_loss(get_logits(s_copy(**model_inputs(quiz_batch))), quiz_batch["labels"])
    v = torch.autograd.grad(ce, [p for p in s_copy.parameters() if p.requires_grad])
    radius = c.lgtm.fd_radius / float(torch.sqrt(sum((vi.double() ** 2).sum() for vi in v)))
    del s_copy, opt_copy

    def teacher_grad(s_logits):
        z = get_logits(teacher(**x))
        lt = kd_scale * task.distill_loss(z, s_logits, y, alpha=alpha_teacher, **kw_t)
        return torch.autograd.grad(lt, t_params), lt.detach()

    # 5-6 (Eq. (6)). three teacher backward passes; saved copy of theta for an exact restore.
    saved = [p.detach().clone() for p in s_params]

    @torch.no_grad()
    def student_logits_at(shift: float) -> torch.Tensor:
        """Student logits at theta + shift * v; theta restored from the saved copy after."""
        for p, vi in zip(s_params, v):
            p.add_(vi, alpha=shift)
        logits = get_logits(student(**x))
        for p, s in zip(s_params, saved):
            p.copy_(s)
        return logits

    s_plus, s_minus = student_logits_at(radius), student_logits_at(-radius)
    g0, lt = teacher_grad(student_logits_at(0.0))
    g_plus, _ = teacher_grad(s_plus)
    g_minus, _ = teacher_grad(s_minus)

    # 7 (Eq. (7), (9)). G = grad L_t(theta) - eta * h, teacher step (eta: the teacher's lr x
    # influence_scale).
    eta = float(teacher_opt.param_groups[0]["lr"]) * c.lgtm.influence_scale
    k = task.kd_scale(temperature, c.scale_by_t2)
    with torch.no_grad():
        l_plus, l_minus = (
            task.kd_per_example(s, t_logits, y, temperature, c.jsd_beta) for s in (s_plus, s_minus)
        )
    influence = -eta * k * (l_plus - l_minus) / (2 * radius)
    G = [a - eta * (b - c) / (2 * radius) for a, b, c in zip(g0, g_plus, g_minus)]
    if gold_batch is not None:
        z = get_logits(teacher(**model_inputs(gold_batch)))
        ce = (1 - kd_scale) * task.task_loss(z, gold_batch["labels"])
        G = [gi + gc for gi, gc in zip(G, torch.autograd.grad(ce, t_params))]
        lt = lt + ce.detach()
    for p, gi in zip(t_params, G):
        p.grad = gi.clone()
    teacher_opt.step()
    teacher_opt.zero_grad(set_to_none=True)

    out = {"teacher_loss": float(lt), "fd_R": radius, "G": [gi.detach() for gi in G]}
    out["influence"] = influence
    # 8. student step with the updated teacher.
    if student_step:
        with torch.no_grad():
            t_new = get_logits(teacher(**x))
        ls = task.distill_loss(get_logits(student(**x)), t_new, y, alpha=alpha_student, **kw_s)
        ls.backward()
        student_opt.step()
        student_opt.zero_grad(set_to_none=True)
        out["student_loss"] = float(ls.detach())
    return out
