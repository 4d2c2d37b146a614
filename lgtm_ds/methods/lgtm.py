"""LGTM: the teacher's update weighted by distillation influence (the cheap exact form).

One LGTM step over a global batch split into micro-batches ``x_j`` (docs/algorithm.md: the
reference step, Eq. (3)-(7), and the exactly equivalent form computed here, Eq. (8)-(9)):

A. per micro-batch: teacher logits, student forward at ``theta`` and
   ``g += grad_theta L_s / n_micro`` (``torch.autograd.grad``: the engine's gradient buffers
   and hooks are not touched); ``g`` is averaged over data-parallel ranks. ZeRO-3: gathered
   module by module from the shards, ``g`` lands in this rank's fp32 parts
   (``Engine.partitioned_backward``).
B. look-ahead ``theta' = theta + AdamW_update(g)`` (student optimizer simulated, state unchanged),
   from the engine's own masters, written into the spent ``g``. ZeRO-3: from A to D ``g``,
   the look-ahead, ``v`` and ``theta`` are this rank's partitions only
   (``engines.base.Sharded``) and each forward gathers one module's parameters at a time.
C. ``v = grad_theta' CE(y_q, f(x_q; theta'))`` over the quiz micro-batches, rank-averaged, so
   ``||v||`` and ``R = r / ||v||`` agree on every rank.
D. per micro-batch: student forwards at ``theta +- R v`` (fp32, formed module by module inside
   the forward: ``Engine.forward_perturbed``; same dropout mask on both sides), one teacher
   forward with graph and ONE teacher backward of ``(z * dL/dz).sum()``; teacher step. (bf16
   teachers: the influence part of dL/dz is backpropagated on its own and added to
   fp32-accumulated gradients, see :func:`grad_apart`.)
E. the student step with the updated teacher (:meth:`Method.student_update`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from dataclasses import dataclass, field

import torch
from pydantic import Field

from ..engines.head import full_shape, grads_through, surrogate
from ..errors import ConfigError
from ..options import Options
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
    # hidden-state KD (methods/hidden.py): the teacher's block outputs (with graph when
    # t_graph is kept) and the student's at theta (detached), per micro-batch
    t_hidden: list[dict] = field(default_factory=list)
    s_hidden: list[dict] = field(default_factory=list)


class LGTMOptions(Options):
    """lgtm only: the finite difference and the influence term's scale."""

    fd_radius: float = Field(1e-2, gt=0, description="finite-difference radius r; R = r / ||v||")
    influence_scale: float = Field(
        1.0,
        ge=0,
        description="multiplier on the influence term eta * h of the teacher update (1.0 = the "
        "paper and the reference: eta = the teacher's learning rate; 0 = online KD with the "
        "same passes)",
    )
    influence_ratio_target: float | None = Field(
        None,
        gt=0,
        description="set eta adaptively so that influence_ratio = |eta grad h| / |grad L_t| (the "
        "influence term's share of the teacher gradient) is this value: eta = target / EMA of "
        "the measured |grad h| / |grad L_t|, measured every influence_ratio_every steps (the "
        "first step uses influence_scale); null = off",
    )
    influence_ratio_every: int | None = Field(
        None,
        ge=0,
        description="measure influence_ratio every N optimizer steps (one extra teacher forward "
        "and two backwards, two fp32 copies of the teacher's gradient); null = every "
        "train.log_every steps; 0 = never",
    )


@METHODS.register
class LGTM(Method):
    name = "lgtm"
    summary = "each step: teacher on L_t weighted by distillation influence, then student L_s"
    needs_quiz = True
    student_passes = True
    reports_influence = True
    Options = LGTMOptions

    # EMA momentum of the measured q = |grad h| / |grad L_t| (method.influence_ratio_target)
    RATIO_EMA = 0.9

    def __init__(self, distiller):
        super().__init__(distiller)
        self.scale = self.options.influence_scale  # eta = teacher lr * scale
        self._q_ema = [0.0, 0]  # (biased EMA of q, measurements): the adaptive scale's state
        warn_low_precision_grads(distiller.teacher, self.name, "influence term")

    def check_task(self, task) -> None:
        task.check_for_lgtm()

    def state_dict(self) -> dict:
        return {"influence_scale": self.scale, "q_ema": list(self._q_ema)}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state.get("influence_scale", self.scale))
        self._q_ema = list(state.get("q_ema", self._q_ema))

    @classmethod
    def check_config(cls, cfg) -> None:
        cls.refuse_fp16(
            cfg,
            "the influence part of the teacher gradient (~1e-5 of the rest) is below fp16 "
            "resolution and the fp32-accumulation path is bf16-only",
            " (the baselines run in fp16)",
        )

    @classmethod
    def prepare_ds_configs(cls, cfg, teacher: dict, student: dict) -> None:
        if cfg.train.precision == "bf16":
            fp32_teacher_grads_(teacher, cls.name)

    @classmethod
    def influence_ratio_every(cls, cfg) -> int:
        every = getattr(cfg.method, cls.name).influence_ratio_every
        return cfg.train.log_every if every is None else every

    # ------------------------------------------------------------------------------------------
    def teacher_update(self, micro, quiz):
        d = self.d
        d.teacher.module.train()
        d.student.module.train()
        split = d.teacher.split_influence_backward
        # one micro-batch: reuse the teacher forward's graph in D. A split influence term is
        # backpropagated through that graph too where the engine offers it unhooked, else
        # through a forward of its own that replays the dropout mask (record_rng)
        keep_graph = len(micro) == 1
        own_pass = split and not d.teacher.reuses_graph_for_influence
        # influence_ratio: on request, and on the first step of an adaptive scale
        target = self.options.influence_ratio_target
        measure = d.telemetry.influence_ratio or (target is not None and self._q_ema[1] == 0)
        w, wq = self.row_weights(micro, quiz)  # each micro-batch's share of the global rows
        record = (measure or own_pass) and keep_graph
        g, fwd = student_grad(d, micro, w, keep_graph, record_rng=record, sharded=True)  # A
        stats = self._example_stats(micro, fwd) if d.telemetry.example_stats else None
        # B: from the engine's own masters (ZeRO-1/2/3: this rank's partitions), written into
        # the spent g. ZeRO-3 (sharded): the look-ahead, v and theta stay this rank's parts from
        # here on and C and D gather module by module; else theta (full) is fetched after C
        look = d.student.lookahead(None, g, adamw_lookahead, reuse_g=True, sharded=True)
        del g
        v, quiz_ce = self._quiz_grad(look, quiz, wq)  # C
        del look
        theta = d.student.master_params(sharded=True)
        v_norm = math.sqrt(d.student.sq_norm(v))  # note: host sync
        if not math.isfinite(v_norm):
            # fp16 overflow in the student's passes: skip this step in both engines (the
            # teacher has not been touched yet)
            return {"skipped": True, "v_norm": v_norm}
        if v_norm == 0:
            raise FloatingPointError(
                "quiz gradient is exactly zero; cannot form R = r/||v|| "
                "(is the student's classifier frozen or zero?)"
            )
        radius = self.options.fd_radius / v_norm
        lr = d.teacher.lr()
        eta = lr * self.scale  # the paper: eta = the teacher's lr
        probe = _RatioProbe(d, len(micro)) if measure else None
        t_loss, influence = self._teacher_steps(
            micro, w, fwd, theta, v, radius, eta, split, probe
        )  # D
        rows = sum(d.task.count_rows(mb) for mb in micro)
        out = {
            "teacher_loss": t_loss,
            # per row (token, for causal LMs); `influence` holds one value per example
            "influence_per_row": float(influence.sum()) / max(rows, 1),
            "quiz_ce_lookahead": float(quiz_ce),
            "v_norm": v_norm,
            "fd_R": radius,
            "eta": eta,
            "influence_scale": self.scale,
            "influence": influence,
        }
        if probe is not None:
            q = probe.q()  # |grad h| / |grad L_t|, eta-free
            out["influence_ratio"] = eta * q
            if target is not None:
                self._adapt(q, target, lr)
        if stats:
            out["example_stats"] = stats
        return out

    def _example_stats(self, micro, fwd: _BatchPass) -> dict:
        """Both models' ``Task.example_stat`` at theta, before either steps (a fused-head
        output reads the live output layer)."""
        name, out = self.d.task.example_stat_name, {}
        for role, logits in (("teacher", fwd.t_logits), ("student", fwd.s_logits)):
            out[f"{role}_{name}"] = torch.cat(
                [self.d.task.example_stat(z, mb["labels"]) for z, mb in zip(logits, micro)]
            ).cpu()
        return out

    def _adapt(self, q: float, target: float, lr: float) -> None:
        """method.influence_ratio_target: ``eta = target / EMA(q)`` from the next step on
        (``q`` per unit eta is measured; the scale is ``eta / lr``)."""
        if not (math.isfinite(q) and q > 0 and lr > 0):
            return  # nothing to scale (no influence gradient, or lr 0): keep the scale
        ema, n = self._q_ema
        ema, n = self.RATIO_EMA * ema + (1 - self.RATIO_EMA) * q, n + 1
        self._q_ema = [ema, n]
        self.scale = target / (ema / (1 - self.RATIO_EMA**n)) / lr

    # -- C ---------------------------------------------------------------------------------------
    def _quiz_grad(self, look, quiz, wq) -> tuple[list[torch.Tensor], torch.Tensor]:
        return quiz_grad(self.d, look, quiz, wq)

    # -- D ---------------------------------------------------------------------------------------
    def _teacher_steps(self, micro, w, fwd: _BatchPass, theta, v, radius, eta, split, probe):
        """Per micro-batch: the perturbed student forwards, dL/dz, one teacher backward, the
        engine step. Returns the mean teacher loss and the per-row influence (CPU). ``probe``
        (a :class:`_RatioProbe` or None) measures the influence share on the way."""
        d, c = self.d, self.d.config
        p = InfluenceParams(
            c.alpha_teacher,
            c.temperature,
            eta,
            radius,
            c.scale_by_t2,
            beta_teacher=c.teacher_beta,
            beta_student=c.jsd_beta,
        )
        n_micro = len(micro)
        device = device_of(d.student)
        influences, t_total, g_infl = [], 0.0, None
        anchor = d.gold_anchor
        for j, mb in enumerate(micro):
            # theta +- R v formed module by module inside the forwards (no full work copy)
            with torch.no_grad(), _same_rng(device) as replay:
                s_plus = d.student.forward_perturbed(theta, v, radius, mb)
                replay()
                s_minus = d.student.forward_perturbed(theta, v, -radius, mb)
            ht = fwd.t_hidden[j] if fwd.t_graph and d.hidden.on else None
            with _same_rng(device) as replay_teacher:
                if fwd.t_graph:
                    z = fwd.t_graph[j]
                else:
                    with d.hidden.capture("teacher") as ht:
                        z = d.teacher.forward(mb)
            if fwd.t_graph and fwd.teacher_rng:
                replay_teacher = fwd.teacher_rng[j]  # the forward ran in step A
            labels, s = mb["labels"], fwd.s_logits[j]
            hs = fwd.s_hidden[j] if d.hidden.on else None
            # a sampled step (anchor): the logit-space terms scaled by a_t (the pass runs with
            # a_t = 1, KD alone), the teacher's CE on the data set's rows of the same prompts
            # added before the backward (the influence_ratio probe leaves that CE out)
            wj = w[j] * anchor.kd_scale if anchor is not None else w[j]
            if probe is not None:
                no_eta = dataclasses.replace(p, eta=0.0)
                main, _ = d.task.lgtm_logit_grad(z, s, s_plus, s_minus, labels, no_eta)
                unit = dataclasses.replace(p, eta=1.0)
                term = d.task.influence_logit_term(s_plus, s_minus, unit, z=z, labels=labels)
                probe.add(mb, replay_teacher, weighted(main, wj), weighted(term, wj), hs, w[j])
            # dL/dz, the influence and L_t in one pass over the logits (before the step: a
            # fused-head z reads the live output layer). split: dL/dz with eta = 0 (bitwise
            # what it would be without the influence term) and the influence term apart
            tp = d.task.lgtm_teacher_pass(z, s, s_plus, s_minus, labels, p, split=split)
            dz, infl = tp.grad, tp.influence
            if split:
                term = weighted(tp.term, wj)
                g_infl = grad_apart(d.teacher, mb, z, replay_teacher, term, g_infl, n_micro)
            t_total += weighted(tp.loss, wj)
            loss = surrogate(z, weighted(dz, wj))  # grad_phi of it: dL/dz through the teacher
            if hs is not None:  # the teacher's hidden-state term, the student's states the target
                share = 1 / n_micro
                loss = loss + weighted(d.hidden.add(0.0, hs, ht, mb, "teacher", share=share), w[j])
            if anchor is not None:
                ce = anchor.ce(j, d.teacher, d.task)
                loss = loss + ce
                t_total += float(ce) if isinstance(ce, float) else ce.detach()
            d.teacher.backward(loss)
            if split and j == n_micro - 1:
                d.teacher.add_grads_(g_infl)  # boundary micro-batch: before the optimizer step
            d.teacher.step()
            influences.append(infl.detach())
        return float(t_total) / n_micro, torch.cat(influences).cpu()


class _RatioProbe:
    """``q = |grad_phi h| / |grad_phi L_t|`` over the teacher's parameters for one global batch
    (rank-averaged gradients, as the engine steps them); ``influence_ratio = eta q``. Per
    micro-batch one extra teacher forward (the same dropout mask) and two backwards with
    ``torch.autograd.grad``: the engine's gradients and RNG stream are untouched, so a step with
    the probe trains exactly as one without. Holds two fp32 copies of the teacher's gradient."""

    def __init__(self, d, n_micro: int):
        self.d, self.n_micro = d, n_micro
        self.main: list[torch.Tensor] | None = None
        self.infl: list[torch.Tensor] | None = None

    def add(self, mb, replay, dz_main, dz_infl, s_hidden=None, w=1.0) -> None:
        """One micro-batch: ``dz_main`` / ``dz_infl`` the two parts of dL/dz (row-weighted);
        ``s_hidden``: the student's states, when ``L_t`` has the hidden-state term."""
        t, hidden = self.d.teacher, self.d.hidden
        with _same_rng(device_of(t)) as restore, hidden.capture("teacher") as ht:
            replay()  # the teacher forward's dropout mask
            z = t.raw_forward(mb)
            restore()
        params = t.params()
        main = surrogate(z, dz_main)
        if s_hidden is not None:
            main = main + weighted(hidden.loss(s_hidden, ht, mb, "teacher"), w)
        gm = torch.autograd.grad(main, params, retain_graph=True, allow_unused=True)
        gm = [torch.zeros_like(p) if g is None else g for p, g in zip(params, gm)]
        gh = grads_through(z, dz_infl, params)
        self.main = _accumulate(self.main, gm, self.n_micro)
        self.infl = _accumulate(self.infl, gh, self.n_micro)

    def q(self) -> float:
        t = self.d.teacher
        t.all_reduce_mean_(self.main)
        t.all_reduce_mean_(self.infl)
        main = math.sqrt(sum(float((g.double() ** 2).sum()) for g in self.main))
        infl = math.sqrt(sum(float((g.double() ** 2).sum()) for g in self.infl))
        self.main = self.infl = None
        return infl / main if main > 0 else math.inf


def grad_apart(t, mb, z, replay, term, acc, n_micro: int) -> list[torch.Tensor]:
    """bf16 teachers: a small part of dL/dz (LGTM's influence term, ~1e-5 of the rest;
    MetaDistil's meta-gradient beside the teacher's CE) would vanish in one bf16 tensor.
    Backpropagate it (``term``) on its own through the teacher ``t`` with
    ``torch.autograd.grad`` (the engine's buffers and hooks untouched), accumulated in fp32 over
    the micro-batches into ``acc`` (divided by ``n_micro``, as the engine divides its own); the
    caller adds it to the engine's fp32 gradients before the step (``add_grads_``). Through the
    graph of the teacher forward ``z`` where the engine offers it unhooked (ZeRO-2: no extra
    forward), else through a module forward of its own after ``replay()`` (the same dropout
    mask; ZeRO-3)."""
    z_alone = t.unhooked(z)
    if z_alone is None:
        replay()
        z_alone = t.raw_forward(mb)
        return _accumulate(acc, grads_through(z_alone, term, t.params()), n_micro)
    grads = grads_through(z_alone, term, t.params(), retain_graph=True)
    return _accumulate(acc, grads, n_micro)


def _accumulate(acc, grads, n_micro: int) -> list[torch.Tensor]:
    """``acc += grads / n_micro`` in fp32 (float64 stays float64)."""
    if acc is None:
        return [g.to(torch.promote_types(g.dtype, torch.float32)) / n_micro for g in grads]
    for a, g in zip(acc, grads):
        a.add_(g.to(a.dtype), alpha=1.0 / n_micro)
    return acc


def student_grad(
    d, micro, w, keep_graph: bool, record_rng: bool = False, sharded: bool = False
) -> tuple[list[torch.Tensor], _BatchPass]:
    """Step A (LGTM and MetaDistil): ``g = grad_theta L_s`` over the micro-batches (fp32,
    rank-averaged; each micro-batch weighted by its row share ``w``) and the logits.
    ``keep_graph``: keep the teacher forwards' graphs; ``record_rng``: a ``replay()`` per
    micro-batch for the teacher and the student forward (their dropout masks, for a later pass).
    ``sharded``: ``g`` as this rank's partitions where the student engine partitions its
    parameters (``Engine.partitioned_backward``, ZeRO-3), else full tensors."""
    if not sharded:
        return _student_grad(d, micro, w, keep_graph, record_rng, None)
    pb = None
    with _same_rng(device_of(d.student)) as replay:
        try:
            with d.student.partitioned_backward() as pb:
                out = _student_grad(d, micro, w, keep_graph, record_rng, pb)
            keep = pb is None or d.student.accept_partitions(pb)
        except Exception as e:  # the first partitioned pass: the model may not allow it
            if pb is None:
                raise
            keep = d.student.accept_partitions(pb, e)  # raises it unless the first pass
            out = None
        if keep:
            return out
        del out
        replay()  # the same dropout masks for the repeat on full tensors
    return _student_grad(d, micro, w, keep_graph, record_rng, None)


def _student_grad(d, micro, w, keep_graph, record_rng, pb):
    params = d.student.params()
    device = device_of(d.student)
    g = None  # full-size fp32 gradients (ZeRO-3 params are empty placeholders: no zeros_like)
    fwd = _BatchPass()
    h = d.hidden
    for mb, wj in zip(micro, w):
        with (
            torch.set_grad_enabled(keep_graph),
            _same_rng(device) as replay_t,
            h.capture("teacher") as ht,
        ):
            z = d.teacher.forward(mb)
        if keep_graph:
            fwd.t_graph.append(z)
        fwd.t_logits.append(z.detach())
        with _same_rng(device) as replay_s, h.capture("student") as hs:
            s = d.student.raw_forward(mb)
        if record_rng:
            fwd.teacher_rng.append(replay_t)
            fwd.student_rng.append(replay_s)
        ls = d.student_loss(s, fwd.t_logits[-1], mb["labels"])
        ls = weighted(h.add(ls, hs, ht, mb, "student", share=0.0), wj)
        if h.on:
            fwd.t_hidden.append(ht)
            fwd.s_hidden.append({k: x.detach() for k, x in hs.items()})
        if pb is not None:  # into this rank's fp32 parts, one module at a time
            pb.backward(ls / len(micro))
            fwd.s_logits.append(s.detach())
            continue
        gs = torch.autograd.grad(ls / len(micro), params, allow_unused=True)
        gs = [  # None: a parameter the loss does not use
            torch.zeros(full_shape(p), dtype=p.dtype, device=p.device) if gi is None else gi
            for gi, p in zip(gs, params)
        ]
        if g is None:  # the first micro-batch's gradients (fresh tensors) are the accumulator
            # (contiguous: the gradient of a parameter's sum() is an expanded view)
            g = [gi.to(torch.promote_types(gi.dtype, torch.float32)).contiguous() for gi in gs]
        else:
            for acc, gi in zip(g, gs):
                acc.add_(gi)
        fwd.s_logits.append(s.detach())
    if pb is not None:
        return pb.grads, fwd  # rank-averaged by the reduce-scatters
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


def warn_low_precision_grads(teacher, method: str, term: str) -> None:
    """A bf16/fp16 teacher that keeps its gradients in its own dtype (plain modules in the
    Python API, a DeepSpeed engine without the fp32 split) loses the small ``term``: warn."""
    if teacher.split_influence_backward:
        return
    dtypes = {p.dtype for p in teacher.params()}
    low = dtypes & {torch.bfloat16, torch.float16}
    if low:
        warnings.warn(
            f"{method}: the teacher's parameters are {sorted(map(str, low))[0]} with gradients "
            f"in that dtype: the {term} (a small part of the teacher's gradient, ~1e-5 for "
            "LGTM) rounds away and the teacher trains as without it. Use fp32 modules (e.g. "
            "with autocast) or DeepSpeed engines (bf16 with ZeRO-2/3 keeps it in fp32)",
            stacklevel=4,
        )


def fp32_teacher_grads_(teacher: dict, method: str, term: str = "influence term") -> None:
    """Make the teacher's DeepSpeed dict fit for a bf16 teacher whose gradient has a small
    part kept apart (:func:`grad_apart`), in place: the part would vanish in bf16 gradients;
    it is backpropagated on its own and added to fp32-accumulated gradients, which DeepSpeed
    offers at ZeRO-2/3 with ``data_types.grad_accum_dtype = fp32``."""
    stage = _stage(teacher)
    if stage < 2:
        raise ConfigError(
            f"method {method} with train.precision=bf16 needs the teacher at ZeRO stage 2 or 3 "
            f"(got {stage}; deepspeed.teacher.zero_optimization.stage): at stage 0/1 DeepSpeed "
            f"keeps bf16 gradients, which round the {term} away"
        )
    data_types = teacher.setdefault("data_types", {})
    if data_types.get("grad_accum_dtype", "fp32") != "fp32":
        raise ConfigError(
            f"method {method} with bf16 needs the teacher's data_types.grad_accum_dtype = fp32, "
            f"got {data_types['grad_accum_dtype']!r}"
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
