"""LGTM: the teacher's update weighted by distillation influence (the cheap exact form).

One LGTM step over a global batch split into micro-batches ``x_j`` (lgtm-method.md):

A. per micro-batch: teacher logits, student forward at ``theta`` and
   ``g += grad_theta L_s / n_micro`` (``torch.autograd.grad``: the engine's gradient buffers
   and hooks are not touched); ``g`` is averaged over data-parallel ranks.
B. look-ahead ``theta' = theta + AdamW_update(g)`` (student optimizer simulated, state unchanged).
C. ``v = grad_theta' CE(y_q, f(x_q; theta'))`` over the quiz micro-batches, rank-averaged, so
   ``||v||`` and ``R = r / ||v||`` agree on every rank.
D. per micro-batch: student forwards at ``theta +- R v`` (fp32 work tensors, same dropout mask
   on both sides), one teacher forward with graph and ONE teacher backward of
   ``(z * dL/dz).sum()``; teacher step. (bf16 teachers: the influence part of dL/dz is
   backpropagated on its own and added to fp32-accumulated gradients, see ``_influence_grad``.)
E. the student step with the updated teacher (:meth:`Method.student_update`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field

import lgtm_kernels
import torch

from ..errors import ConfigError
from ..tasks.base import InfluenceParams
from .base import METHODS, Method, device_of, weighted
from .lookahead import adamw_lookahead


@dataclass
class _BatchPass:
    """What step A keeps per micro-batch for step D."""

    t_graph: list[torch.Tensor] = field(default_factory=list)  # teacher logits with graph
    t_logits: list[torch.Tensor] = field(default_factory=list)
    s_logits: list[torch.Tensor] = field(default_factory=list)  # student at theta
    teacher_rng: list = field(default_factory=list)  # replay() per micro-batch (record_rng)
    student_rng: list = field(default_factory=list)


@METHODS.register
class LGTM(Method):
    name = "lgtm"
    summary = "each step: teacher on L_t weighted by distillation influence, then student L_s"
    needs_quiz = True

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.train.precision == "fp16":
            raise ConfigError(
                "method lgtm with train.precision=fp16 is not supported yet: the influence part of "
                "the teacher gradient (~1e-5 of the rest) is below fp16 resolution and the "
                "fp32-accumulation path is bf16-only; use bf16 or fp32 (the baselines run in fp16)"
            )

    @classmethod
    def prepare_ds_configs(cls, cfg, teacher: dict, student: dict) -> None:
        if cfg.train.precision == "bf16":
            _fp32_teacher_grads_(teacher)

    # ------------------------------------------------------------------------------------------
    def teacher_update(self, micro, quiz):
        d = self.d
        d.teacher.module.train()
        d.student.module.train()
        split = d.teacher.split_influence_backward
        # one micro-batch: reuse the teacher forward's graph in D (not when the influence term is
        # backpropagated on its own: that pass replays the dropout mask of D's forward)
        keep_graph = len(micro) == 1 and not split
        w, wq = self.row_weights(micro, quiz)  # each micro-batch's share of the global rows
        g, fwd = self._student_grad(micro, w, keep_graph)  # A
        theta = d.student.master_params()
        look = adamw_lookahead(theta, g, d.student.adam_state())  # B
        del g
        v, quiz_ce = self._quiz_grad(look, quiz, wq)  # C
        del look
        v_norm = float(torch.sqrt(sum((vi.double() ** 2).sum() for vi in v)))  # note: host sync
        if not math.isfinite(v_norm):
            # fp16 overflow in the student's passes: skip this step in both engines (the
            # teacher has not been touched yet)
            return {"skipped": True, "v_norm": v_norm}
        if v_norm == 0:
            raise FloatingPointError(
                "quiz gradient is exactly zero; cannot form R = r/||v|| "
                "(is the student's classifier frozen or zero?)"
            )
        radius = d.hp.fd_radius / v_norm
        eta = d.teacher.lr() * d.hp.influence_scale  # the paper: eta = the teacher's lr
        t_loss, influence = self._teacher_steps(micro, w, fwd, theta, v, radius, eta, split)  # D
        rows = sum(d.task.count_rows(mb) for mb in micro)
        return {
            "teacher_loss": t_loss,
            # per row (token, for causal LMs); `influence` holds one value per example
            "influence_per_row": float(influence.sum()) / max(rows, 1),
            "quiz_ce_lookahead": float(quiz_ce),
            "v_norm": v_norm,
            "fd_R": radius,
            "eta": eta,
            "influence": influence,
        }

    # -- A ---------------------------------------------------------------------------------------
    def _student_grad(self, micro, w, keep_graph: bool) -> tuple[list[torch.Tensor], _BatchPass]:
        return student_grad(self.d, micro, w, keep_graph)

    # -- C ---------------------------------------------------------------------------------------
    def _quiz_grad(self, look, quiz, wq) -> tuple[list[torch.Tensor], torch.Tensor]:
        return quiz_grad(self.d, look, quiz, wq)

    # -- D ---------------------------------------------------------------------------------------
    def _teacher_steps(self, micro, w, fwd: _BatchPass, theta, v, radius, eta, split):
        """Per micro-batch: the perturbed student forwards, dL/dz, one teacher backward, the
        engine step. Returns the mean teacher loss and the per-row influence (CPU)."""
        d, hp = self.d, self.d.hp
        p = InfluenceParams(
            hp.alpha_teacher,
            hp.temperature,
            eta,
            radius,
            hp.scale_by_t2,
            beta_teacher=hp.teacher_beta,
            beta_student=hp.jsd_beta,
        )
        n_micro = len(micro)
        work = [torch.empty_like(t) for t in theta]
        device = device_of(d.student)
        influences, t_total, g_infl = [], 0.0, None
        for j, mb in enumerate(micro):
            with torch.no_grad(), _same_rng(device) as replay:
                _axpy(work, theta, v, radius)
                s_plus = d.student.forward_at(work, mb)
                replay()
                _axpy(work, theta, v, -radius)
                s_minus = d.student.forward_at(work, mb)
            with _same_rng(device) as replay_teacher:
                z = fwd.t_graph[j] if fwd.t_graph else d.teacher.forward(mb)
            labels, s = mb["labels"], fwd.s_logits[j]
            dz, infl = d.task.lgtm_logit_grad(z, s, s_plus, s_minus, labels, p)
            if split:
                # the main part with eta = 0: bitwise what it would be without the influence term
                no_eta = dataclasses.replace(p, eta=0.0)
                dz, _ = d.task.lgtm_logit_grad(z, s, s_plus, s_minus, labels, no_eta)
                term = d.task.influence_logit_term(s_plus, s_minus, p, z=z, labels=labels)
                term = weighted(term, w[j])
                replay_teacher()
                g_infl = self._influence_grad(mb, term, g_infl, n_micro)
            d.teacher.backward((z * weighted(dz, w[j]).to(z.dtype)).sum())
            if split and j == n_micro - 1:
                d.teacher.add_grads_(g_infl)  # boundary micro-batch: before the optimizer step
            d.teacher.step()
            influences.append(infl.detach())
            with torch.no_grad():
                t_total += weighted(d.teacher_loss(z.detach(), s, labels), w[j])
        return float(t_total) / n_micro, torch.cat(influences).cpu()

    def _influence_grad(self, mb, term, acc, n_micro):
        """bf16 teachers: the influence part of dL/dz is ~1e-5 of the rest and would vanish in
        one bf16 tensor. Backpropagate it on its own (module forward with the same dropout mask,
        ``torch.autograd.grad``: the engine's buffers and hooks untouched), accumulated in fp32
        over the micro-batches; added to the engine's fp32 gradients before the step."""
        t = self.d.teacher
        z_alone = t.raw_forward(mb)
        gs = torch.autograd.grad(z_alone, t.params(), grad_outputs=term.to(z_alone.dtype))
        if acc is None:
            return [gi.float() / n_micro for gi in gs]
        for a, gi in zip(acc, gs):
            a.add_(gi.float(), alpha=1.0 / n_micro)
        return acc


def student_grad(
    d, micro, w, keep_graph: bool, record_rng: bool = False
) -> tuple[list[torch.Tensor], _BatchPass]:
    """Step A (LGTM and MetaDistil): ``g = grad_theta L_s`` over the micro-batches (fp32,
    rank-averaged; each micro-batch weighted by its row share ``w``) and the logits.
    ``keep_graph``: keep the teacher forwards' graphs; ``record_rng``: a ``replay()`` per
    micro-batch for the teacher and the student forward (their dropout masks, for a later pass)."""
    params = d.student.params()
    device = device_of(d.student)
    g = None  # full-size fp32 gradients (ZeRO-3 params are empty placeholders: no zeros_like)
    fwd = _BatchPass()
    for mb, wj in zip(micro, w):
        with torch.set_grad_enabled(keep_graph), _same_rng(device) as replay_t:
            z = d.teacher.forward(mb)
        if keep_graph:
            fwd.t_graph.append(z)
        fwd.t_logits.append(z.detach())
        with _same_rng(device) as replay_s:
            s = d.student.raw_forward(mb)
        if record_rng:
            fwd.teacher_rng.append(replay_t)
            fwd.student_rng.append(replay_s)
        ls = weighted(d.student_loss(s, fwd.t_logits[-1], mb["labels"]), wj)
        gs = torch.autograd.grad(ls / len(micro), params)
        if g is None:
            g = [gi.to(torch.promote_types(gi.dtype, torch.float32)).clone() for gi in gs]
        else:
            for acc, gi in zip(g, gs):
                acc.add_(gi)
        fwd.s_logits.append(s.detach())
    d.student.all_reduce_mean_(g)
    return g, fwd


def quiz_grad(d, params, quiz, wq) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``v``: the student's task-loss gradient at ``params`` (the look-ahead / pilot student) on
    the quiz batches (each weighted by its share ``wq`` of the global quiz rows), rank-averaged;
    and the mean quiz loss."""
    w_of = {id(qb): wj for qb, wj in zip(quiz, wq)}
    v, quiz_ce = d.student.grad_at(
        params,
        quiz,
        lambda logits, qb: weighted(d.task.task_loss(logits, qb["labels"]), w_of[id(qb)]),
    )
    d.student.all_reduce_mean_(v)
    return v, quiz_ce


def _stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def _fp32_teacher_grads_(teacher: dict) -> None:
    """Make the teacher's DeepSpeed dict fit for bf16 LGTM (in place).

    The influence part of the teacher gradient is ~1e-5 of the rest and vanishes in bf16
    gradients; it is backpropagated on its own and added to fp32-accumulated gradients, which
    DeepSpeed offers at ZeRO-2/3 with ``data_types.grad_accum_dtype = fp32``."""
    stage = _stage(teacher)
    if stage < 2:
        raise ConfigError(
            f"method lgtm with train.precision=bf16 needs the teacher at ZeRO stage 2 or 3 (got "
            f"{stage}; deepspeed.teacher.zero_optimization.stage): at stage 0/1 DeepSpeed keeps "
            f"bf16 gradients, which round the influence term away"
        )
    data_types = teacher.setdefault("data_types", {})
    if data_types.get("grad_accum_dtype", "fp32") != "fp32":
        raise ConfigError(
            f"method lgtm with bf16 needs the teacher's data_types.grad_accum_dtype = fp32, got "
            f"{data_types['grad_accum_dtype']!r}"
        )
    data_types["grad_accum_dtype"] = "fp32"


@contextlib.contextmanager
def _same_rng(device: torch.device):
    """Run a block twice with the same RNG (dropout) state: ``with _same_rng(d) as replay``."""
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def replay():
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)

    yield replay


def _axpy(out: list[torch.Tensor], x: list[torch.Tensor], v: list[torch.Tensor], a: float) -> None:
    """``out = x + a * v`` over lists: ``lgtm_kernels.perturb_`` from the fp32 source (one launch
    on CUDA); fp64 (the test oracle) elementwise in fp64."""
    if all(o.dtype == torch.float32 for o in out):
        lgtm_kernels.perturb_(out, v, a, source=x)
        return
    for o, xi, vi in zip(out, x, v):
        torch.add(xi, vi, alpha=a, out=o)
