"""What one distillation step computes: LGTM (cheap exact form), online KD, vanilla KD.

This module talks only to the :class:`~lgtm_ds.engines.Engine` interface: no DeepSpeed, Triton,
wandb or YAML here, so it runs on CPU in unit tests with plain modules.

One LGTM step over a global batch split into micro-batches ``x_j`` (lgtm-method.md):

A. per micro-batch: teacher logits (no grad), student forward at ``theta`` and
   ``g += grad_theta L_s / n_micro`` (``torch.autograd.grad``: the engine's gradient buffers
   and hooks are not touched); ``g`` is averaged over data-parallel ranks.
B. look-ahead ``theta' = theta + AdamW_update(g)`` (student optimizer simulated, state unchanged).
C. ``v = grad_theta' CE(y_q, f(x_q; theta'))`` over the quiz micro-batches, rank-averaged, so
   ``||v||`` and ``R = r / ||v||`` agree on every rank.
D. per micro-batch: student forwards at ``theta +- R v`` (fp32 work tensors, same dropout mask
   on both sides), one teacher forward with graph and ONE teacher backward of
   ``(z * dL/dz).sum()``; teacher step. (bf16 teachers: the influence part of dL/dz is
   backpropagated on its own and added to fp32-accumulated gradients, see ``split`` below.)
E. per micro-batch: teacher forward (no grad) with the updated teacher, real student step.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import lgtm_kernels
import torch
from torch import nn

from . import losses
from .engines import Engine, TorchEngine, adamw_lookahead
from .errors import ConfigError

METHODS = ("lgtm", "online_kd", "vanilla_kd")


@dataclass
class DistillHParams:
    alpha_student: float = 1.0
    alpha_teacher: float = 0.4
    temperature: float = 1.0
    fd_radius: float = 1e-2
    scale_by_t2: bool = False


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


def _as_list(batch) -> list[dict]:
    return list(batch) if isinstance(batch, list | tuple) else [batch]


def _device_of(engine: Engine) -> torch.device:
    for p in engine.module.parameters():
        return p.device
    return torch.device("cpu")


class Distiller:
    """One object that runs a distillation method step by step on two engines.

    ``teacher`` / ``student`` are either :class:`Engine` objects (DeepSpeed adapters) or plain
    ``nn.Module`` s, in which case ``teacher_optimizer`` / ``student_optimizer`` (torch optimizers;
    AdamW at least for the LGTM student) are required and wrapped in :class:`TorchEngine`.
    ``eta`` (the teacher learning rate in the influence term) is read from the teacher optimizer.
    """

    def __init__(
        self,
        method: str = "lgtm",
        *,
        teacher,
        student,
        teacher_optimizer=None,
        student_optimizer=None,
        alpha_student: float = 1.0,
        alpha_teacher: float = 0.4,
        temperature: float = 1.0,
        fd_radius: float = 1e-2,
        scale_by_t2: bool = False,
        teacher_scheduler=None,
        student_scheduler=None,
        gradient_accumulation_steps: int = 1,
        max_grad_norm: float = 0.0,
    ):
        if method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
        if fd_radius <= 0:
            raise ConfigError(f"fd_radius must be > 0, got {fd_radius}")
        self.method = method
        self.hp = DistillHParams(alpha_student, alpha_teacher, temperature, fd_radius, scale_by_t2)
        self.teacher = self._wrap(
            teacher,
            teacher_optimizer,
            teacher_scheduler,
            gradient_accumulation_steps,
            max_grad_norm,
            "teacher",
        )
        self.student = self._wrap(
            student,
            student_optimizer,
            student_scheduler,
            gradient_accumulation_steps,
            max_grad_norm,
            "student",
        )

    @staticmethod
    def _wrap(model, optimizer, scheduler, gas, max_grad_norm, role) -> Engine:
        if isinstance(model, Engine):
            return model
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"{role} must be an nn.Module or an Engine, got {type(model).__name__}"
            )
        return TorchEngine(
            model,
            optimizer,
            scheduler,
            gradient_accumulation_steps=gas,
            max_grad_norm=max_grad_norm,
        )

    # ------------------------------------------------------------------------------------------
    def step(self, batch, quiz_batch=None) -> dict:
        """One full step: teacher update (if the method trains it), then student update.

        ``batch`` / ``quiz_batch``: a dict of tensors, or a list of micro-batch dicts whose length
        is the engines' gradient accumulation steps. Returns losses (floats) and, for LGTM, the
        per-sample ``influence`` of the batch (tensor, rows of all micro-batches concatenated).
        """
        micro = _as_list(batch)
        if len(micro) != self.student.gradient_accumulation_steps:
            raise ConfigError(
                f"got {len(micro)} micro-batches, but the engines accumulate "
                f"{self.student.gradient_accumulation_steps}"
            )
        if self.method == "lgtm":
            if quiz_batch is None:
                raise ConfigError("method 'lgtm' needs a quiz_batch (held-out data)")
            metrics = self._lgtm_teacher_update(micro, _as_list(quiz_batch))
        elif self.method == "online_kd":
            metrics = self._online_teacher_update(micro)
        else:
            metrics = {}
        teacher_stepped = self.method != "vanilla_kd"
        if metrics.get("skipped") or (teacher_stepped and self.teacher.step_skipped):
            # fp16 overflow in the teacher (or a non-finite influence pass): skip both steps
            metrics["skipped"] = True
            return metrics
        metrics.update(self._student_update(micro))
        return metrics

    def teacher_finetune_step(self, batch) -> dict:
        """Vanilla KD stage 1: the teacher alone on its cross-entropy."""
        self.teacher.module.train()
        total = 0.0
        for mb in _as_list(batch):
            loss = losses.task_loss(self.teacher.forward(mb), mb["labels"])
            self.teacher.backward(loss)
            self.teacher.step()
            total += loss.detach()
        return {"teacher_ce": float(total) / len(_as_list(batch))}

    # ------------------------------------------------------------------------------------------
    def _student_update(self, micro: list[dict]) -> dict:
        hp = self.hp
        self.teacher.module.eval() if self.method == "vanilla_kd" else self.teacher.module.train()
        self.student.module.train()
        total = 0.0
        for mb in micro:
            with torch.no_grad():
                t_logits = self.teacher.forward(mb)
            s_logits = self.student.forward(mb)
            loss = losses.student_loss(
                s_logits,
                t_logits,
                mb["labels"],
                alpha=hp.alpha_student,
                temperature=hp.temperature,
                scale_by_t2=hp.scale_by_t2,
            )
            self.student.backward(loss)
            self.student.step()
            total += loss.detach()
        return {"student_loss": float(total) / len(micro)}

    def _online_teacher_update(self, micro: list[dict]) -> dict:
        hp = self.hp
        self.teacher.module.train()
        self.student.module.train()
        total = 0.0
        for mb in micro:
            with torch.no_grad():
                s_logits = self.student.forward(mb)
            z = self.teacher.forward(mb)
            loss = losses.teacher_loss(
                z,
                s_logits,
                mb["labels"],
                alpha=hp.alpha_teacher,
                temperature=hp.temperature,
                scale_by_t2=hp.scale_by_t2,
            )
            self.teacher.backward(loss)
            self.teacher.step()
            total += loss.detach()
        return {"teacher_loss": float(total) / len(micro)}

    def _lgtm_teacher_update(self, micro: list[dict], quiz: list[dict]) -> dict:
        hp = self.hp
        teacher, student = self.teacher, self.student
        teacher.module.train()
        student.module.train()
        params = student.params()
        n_micro = len(micro)
        split = teacher.split_influence_backward
        # one micro-batch: reuse the teacher forward's graph in D (not when the influence term is
        # backpropagated on its own: that pass replays the dropout mask of D's forward)
        keep_graph = n_micro == 1 and not split

        # A. student gradient on the training batch, at theta, w.r.t. the current teacher.
        g = None  # full-size fp32 gradients (ZeRO-3 params are empty placeholders: no zeros_like)
        t_graph, t_logits, s_logits = [], [], []
        for mb in micro:
            if keep_graph:
                z = teacher.forward(mb)
                t_graph.append(z)
                t_logits.append(z.detach())
            else:
                with torch.no_grad():
                    t_logits.append(teacher.forward(mb))
            s = student.raw_forward(mb)
            ls = losses.student_loss(
                s,
                t_logits[-1],
                mb["labels"],
                alpha=hp.alpha_student,
                temperature=hp.temperature,
                scale_by_t2=hp.scale_by_t2,
            )
            gs = torch.autograd.grad(ls / n_micro, params)
            if g is None:
                g = [gi.to(torch.promote_types(gi.dtype, torch.float32)).clone() for gi in gs]
            else:
                for acc, gi in zip(g, gs):
                    acc.add_(gi)
            s_logits.append(s.detach())
        student.all_reduce_mean_(g)

        # B. look-ahead student theta' (fp32 work tensors, optimizer state untouched).
        theta = student.master_params()
        state = student.adam_state()
        look = adamw_lookahead(theta, g, state)
        del g

        # C. quiz gradient v at theta'.
        v, quiz_ce = student.grad_at(
            look, quiz, lambda logits, qb: losses.task_loss(logits, qb["labels"])
        )
        del look
        student.all_reduce_mean_(v)
        v_norm = torch.sqrt(sum((vi.double() ** 2).sum() for vi in v))
        v_norm_f = float(v_norm)  # note: host sync, R is a python scalar for the kernels
        if not math.isfinite(v_norm_f):
            # fp16 overflow in the student's passes: skip this step in both engines (the
            # teacher has not been touched yet)
            return {"skipped": True, "v_norm": v_norm_f}
        if v_norm_f == 0:
            raise FloatingPointError(
                "quiz gradient is exactly zero; cannot form R = r/||v|| "
                "(is the student's classifier frozen or zero?)"
            )
        radius = hp.fd_radius / v_norm_f

        # D. perturbed student forwards, then one teacher backward per micro-batch.
        eta = teacher.lr()
        influences = []
        t_total = 0.0
        work = [torch.empty_like(t) for t in theta]
        device = _device_of(student)
        t_params = teacher.params() if split else None
        g_infl = None
        for j, mb in enumerate(micro):
            with torch.no_grad(), _same_rng(device) as replay:
                _axpy(work, theta, v, radius)
                s_plus = student.forward_at(work, mb)
                replay()
                _axpy(work, theta, v, -radius)
                s_minus = student.forward_at(work, mb)
            with _same_rng(device) as replay_teacher:
                z = t_graph[j] if keep_graph else teacher.forward(mb)
            kw = dict(
                alpha_teacher=hp.alpha_teacher,
                temperature=hp.temperature,
                eta=eta,
                radius=radius,
                scale_by_t2=hp.scale_by_t2,
            )
            dz, infl = losses.lgtm_teacher_logit_grad(
                z, s_logits[j], s_plus, s_minus, mb["labels"], **kw
            )
            if split:
                # bf16 teacher: the influence part of dL/dz is ~1e-5 of the rest and would vanish
                # in one bf16 tensor. Backpropagate it on its own (module forward with the same
                # dropout mask, torch.autograd.grad: the engine's buffers and hooks untouched)
                # and add it to the fp32-accumulated gradients before the step.
                # the main part with eta = 0: bitwise what it would be without the influence term
                dz, _ = losses.lgtm_teacher_logit_grad(
                    z, s_logits[j], s_plus, s_minus, mb["labels"], **{**kw, "eta": 0.0}
                )
                term = losses.influence_logit_term(s_plus, s_minus, **kw)
                replay_teacher()
                z_alone = teacher.raw_forward(mb)
                gs = torch.autograd.grad(z_alone, t_params, grad_outputs=term.to(z_alone.dtype))
                if g_infl is None:
                    g_infl = [gi.float() / n_micro for gi in gs]
                else:
                    for acc, gi in zip(g_infl, gs):
                        acc.add_(gi.float(), alpha=1.0 / n_micro)
                del z_alone, gs
            teacher.backward((z * dz.to(z.dtype)).sum())
            if split and j == n_micro - 1:
                teacher.add_grads_(g_infl)  # boundary micro-batch: before the optimizer step
            teacher.step()
            influences.append(infl.detach())
            with torch.no_grad():
                t_total += losses.teacher_loss(
                    z.detach(),
                    s_logits[j],
                    mb["labels"],
                    alpha=hp.alpha_teacher,
                    temperature=hp.temperature,
                    scale_by_t2=hp.scale_by_t2,
                )
        del work
        return {
            "teacher_loss": float(t_total) / n_micro,
            "quiz_ce_lookahead": float(quiz_ce),
            "v_norm": v_norm_f,
            "fd_R": radius,
            "eta": eta,
            "influence": torch.cat(influences).cpu(),
        }


def _axpy(out: list[torch.Tensor], x: list[torch.Tensor], v: list[torch.Tensor], a: float) -> None:
    """``out = x + a * v`` over lists: ``lgtm_kernels.perturb_`` from the fp32 source (one launch
    on CUDA); fp64 (the test oracle) elementwise in fp64."""
    if all(o.dtype == torch.float32 for o in out):
        lgtm_kernels.perturb_(out, v, a, source=x)
        return
    for o, xi, vi in zip(out, x, v):
        torch.add(xi, vi, alpha=a, out=o)
