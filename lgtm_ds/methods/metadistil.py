"""MetaDistil (Zhou et al., ACL 2022): the teacher learns from the quiz loss of a pilot student.

One step over a global batch split into micro-batches ``x_j`` (row weights ``w_j`` as in every
method):

A. per micro-batch: teacher logits ``z_j`` (no graph), the student forward at ``theta`` and
   ``g = grad_theta L_s(theta; z)`` (fp32, rank-averaged): LGTM's step A.
B. the pilot student ``theta' = theta - lam * g``: one simulated SGD step (``lam`` =
   ``method.pilot_lr``, default the student's current learning rate); no engine state changes.
C. ``v = grad_theta' CE(y_q, f(x_q; theta'))`` over the quiz micro-batches, rank-averaged.
D. the teacher's meta-gradient, exact (second order through the pilot step)::

     d CE_q(theta'(z)) / d z_j = -lam * d/dz_j < dL_s/ds (s_j, z_j), J_j v >

   ``J_j v`` is the derivative of the student's logits along ``v`` at ``theta`` (forward-mode
   AD through the student, the dropout mask of step A, the math attention kernel, which has
   forward-mode rules); the mixed second derivative of ``L_s`` in logit space is autograd on
   ``[N, V]`` tensors. No double backward through either network, no copy of a model or an
   optimizer. Per micro-batch one teacher forward with graph (step A's, kept, when the step has
   one micro-batch; else again with A's dropout mask) and one backward of
   ``(z_j * dz_j).sum()`` (+ ``method.teacher_ce_weight`` times the teacher's own CE), then
   the teacher's engine step.
E. the student's step with the updated teacher (:meth:`Method.student_update`).

With data parallelism each rank differentiates its own micro-batches' share of ``g``; the
teacher engine's average over ranks then gives the gradient of the global quiz loss.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from ..engines.head import surrogate as head_surrogate
from ..options import Options
from .base import METHODS, Method, weighted
from .lgtm import fp32_teacher_grads_, grad_apart, quiz_grad, student_grad, warn_low_precision_grads

_PILOT_LR = (
    "learning rate of the pilot student's simulated SGD step; null = the student's current "
    "learning rate; 0 = no meta-gradient (the teacher's CE only)"
)


class MetaDistilOptions(Options):
    """metadistil only: the pilot step and the teacher's own CE."""

    pilot_lr: float | None = Field(None, ge=0, description=_PILOT_LR)
    teacher_ce_weight: float = Field(
        0.0,
        ge=0,
        description="weight of the teacher's own CE next to the pilot student's quiz loss (0 = "
        "MetaDistil as published: the quiz loss only)",
    )


@METHODS.register
class MetaDistil(Method):
    name = "metadistil"
    summary = (
        "each step: teacher on the quiz loss of a pilot student one SGD step ahead (exact "
        "second order), then student L_s"
    )
    needs_quiz = True
    student_passes = True
    Options = MetaDistilOptions

    @classmethod
    def onpolicy_overrides(cls) -> dict:
        return {cls.name: {"teacher_ce_weight": 0.0}}  # no CE on sampled tokens

    @classmethod
    def teacher_gold_terms(cls, config) -> tuple[float, float]:
        # the meta-gradient unscaled; teacher_ce_weight's CE moves to the data set's rows
        return 1.0, getattr(config, cls.name).teacher_ce_weight

    @classmethod
    def check_config(cls, cfg) -> None:
        cls.refuse_fp16(cfg, "the pilot step's forward-mode pass has no loss scaling")

    def __init__(self, distiller):
        super().__init__(distiller)
        if self.options.teacher_ce_weight > 0:
            term = "meta-gradient beside the teacher's CE"
            warn_low_precision_grads(distiller.teacher, self.name, term)

    @classmethod
    def prepare_ds_configs(cls, cfg, teacher: dict, student: dict) -> None:
        # a bf16 teacher with its own CE: the meta-gradient (~1e-4 of the CE's) is kept apart
        if cfg.train.precision == "bf16" and getattr(cfg.method, cls.name).teacher_ce_weight > 0:
            fp32_teacher_grads_(teacher, cls.name, "meta-gradient beside the teacher's CE")

    def teacher_update(self, micro, quiz):
        d = self.d
        d.teacher.module.train()
        d.student.module.train()
        w, wq = self.row_weights(micro, quiz)
        n = len(micro)
        # A (LGTM's), recording each micro-batch's dropout masks for D; one micro-batch keeps
        # the teacher forward's graph, more forward the teacher again in D (one graph at a time)
        g, a = student_grad(d, micro, w, keep_graph=n == 1, record_rng=True)
        theta = d.student.master_params()
        opts = self.options
        lam = opts.pilot_lr if opts.pilot_lr is not None else d.student.lr()
        pilot = [t - lam * gi.to(t.dtype) for t, gi in zip(theta, g)]  # B
        del g
        v, quiz_ce = quiz_grad(d, pilot, quiz, wq)  # C
        del pilot
        v_norm = float(torch.sqrt(sum((vi.double() ** 2).sum() for vi in v)))  # note: host sync
        if not math.isfinite(v_norm):
            return {"skipped": True, "v_norm": v_norm}
        ce_w, t_total, meta_sq = opts.teacher_ce_weight, 0.0, 0.0
        anchor = d.gold_anchor  # a sampled step: the teacher's CE on the data set's rows
        gold_ce = anchor is not None and anchor.ce_weight > 0
        # bf16 teacher with its own CE: the meta-gradient would round away beside the CE's in
        # one bf16 dL/dz; backpropagated apart, added in fp32 (as LGTM's influence term)
        split = (ce_w > 0 or gold_ce) and d.teacher.split_influence_backward
        g_meta = None
        for j, mb in enumerate(micro):  # D
            a.student_rng[j]()  # the dropout mask of step A's student forward
            s_j, u_j = d.student.jvp_at(theta, v, mb)  # fused head: HeadOutputs, no logits
            hp = d.config
            dz, sq = d.task.meta_logit_grad(
                a.t_logits[j], s_j, u_j, mb["labels"], coef=-lam * w[j] / n,
                alpha=hp.alpha_student, temperature=hp.temperature,
                scale_by_t2=hp.scale_by_t2, beta=hp.jsd_beta,
            )  # fmt: skip
            meta_sq += sq
            if a.t_graph:  # one micro-batch: step A's teacher forward kept its graph
                z = a.t_graph[j]
            else:  # step A's teacher forward again, same dropout mask, now with graph
                a.teacher_rng[j]()
                z = d.teacher.forward(mb)
            if split:  # n * dz: the engine divides its own backward by n, grad_apart too
                g_meta = grad_apart(d.teacher, mb, z, a.teacher_rng[j], dz * n, g_meta, n)
                surrogate = 0.0
            else:
                surrogate = head_surrogate(z, dz) * n  # the engine divides by n
            if ce_w > 0:
                ce = weighted(d.task.task_loss(z, mb["labels"]), w[j])
                surrogate = surrogate + ce_w * ce
                t_total += float(ce.detach())
            if gold_ce:  # the CE of the same prompts' data-set completions (teacher_ce_weight)
                surrogate = surrogate + anchor.ce(j, d.teacher, d.task)
            d.teacher.backward(surrogate)
            if split and j == n - 1:
                d.teacher.add_grads_(g_meta)  # boundary micro-batch: before the optimizer step
            d.teacher.step()
        out = {
            "quiz_ce_pilot": float(quiz_ce),
            "v_norm": v_norm,
            "meta_grad_norm": math.sqrt(meta_sq),  # |dCE_q/dz| over this rank's rows
            "pilot_lr": lam,
        }
        if ce_w > 0:
            out["teacher_ce"] = t_total / n
        return out
