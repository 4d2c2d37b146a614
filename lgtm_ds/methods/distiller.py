"""``Distiller``: a method, two engines and a task, stepped together."""

from __future__ import annotations

import time
import warnings
from typing import Any

from torch import nn

from ..engines.base import Engine, InfluencePasses, TorchEngine
from ..engines.head import FUSED_HEAD_DEFAULT, FullLogitsWarning, enable_fused_head
from ..errors import ConfigError
from ..tasks import Task, get_task, task_from_batch
from .base import METHODS, Method, Telemetry
from .config import MethodSection, method_config
from .hidden import HiddenKD, HiddenSpec, attach_projection
from .onpolicy import GoldAnchor, OnPolicy


def as_list(batch) -> list[dict]:
    """A batch dict, or a list of micro-batch dicts -> a list of micro-batch dicts."""
    return list(batch) if isinstance(batch, list | tuple) else [batch]


class Distiller:
    """Runs one distillation method step by step on a teacher and a student.

    ``teacher`` / ``student`` are :class:`Engine` objects (the DeepSpeed adapters) or plain
    ``nn.Module`` s, which are wrapped in :class:`TorchEngine` with ``teacher_optimizer`` /
    ``student_optimizer`` (torch optimizers; AdamW for an LGTM student). ``task`` is a task type
    name (``"classification"``, ``"regression"``, ``"causal_lm"``, any registered one) or a
    :class:`Task`; None picks it from the first batch (the first registered type whose
    :meth:`Task.claims_batch` takes it: ``labels`` of shape [B, L] (-100 = ignored) is a
    causal-LM batch, [B] a classification batch; regression must be named).

    The hyper-parameters are the experiment's ``method`` section (:mod:`.config`): ``config``
    (e.g. ``cfg.method`` of a loaded experiment) and/or keywords of that section, flat or nested
    (``alpha_student=1.0``, ``fd_radius=1e-3``, ``lgtm={"influence_scale": 2.0}``), each with
    the experiment's default where not given. ``eta`` of the LGTM influence term is the teacher
    optimizer's current learning rate. ``fused_head`` (``model.fused_head``, default on):
    decoders take every loss from hidden states through the output layer, chunk by chunk
    (``engines/head.py``), where the method and the models allow it; elsewhere full logits,
    with a warning naming the reason. ``gradient_accumulation_steps`` and ``max_grad_norm``
    (plain modules) default as ``train.*`` does. ``tokenizer`` (its pad and EOS ids) and
    ``seed`` (``train.seed``): on-policy steps (``method.lmbda``, ``method.seq_kd``;
    :mod:`.onpolicy`) need the first and draw from the second.
    """

    def __init__(
        self,
        method: str | None = None,
        *,
        teacher: nn.Module | Engine,
        student: nn.Module | Engine,
        task: str | Task | None = None,
        config: MethodSection | None = None,
        teacher_optimizer=None,
        student_optimizer=None,
        teacher_scheduler=None,
        student_scheduler=None,
        gradient_accumulation_steps: int = 1,
        max_grad_norm: float = 0.0,
        fused_head: bool = FUSED_HEAD_DEFAULT,
        tokenizer=None,
        seed: int = 0,
        **hparams: Any,
    ):
        self.config = method_config(method, config, **hparams)
        method_cls = METHODS.get(self.config.name)
        self.task: Task | None = get_task(task)() if isinstance(task, str) else task
        spec = HiddenSpec.of(self.config)
        if not isinstance(student, Engine) and not isinstance(teacher, Engine):
            # plain modules: the projections (if the widths differ) join the student optimizer
            new = attach_projection(student, teacher, spec)
            if new and student_optimizer is not None:
                student_optimizer.add_param_group({"params": new})
        wrap = dict(gradient_accumulation_steps=gradient_accumulation_steps)
        wrap["max_grad_norm"] = max_grad_norm
        self.teacher = _engine(teacher, teacher_optimizer, teacher_scheduler, "teacher", **wrap)
        self.student = _engine(student, student_optimizer, student_scheduler, "student", **wrap)
        if method_cls.student_passes and not isinstance(self.student, InfluencePasses):
            raise ConfigError(
                f"method {method_cls.name!r} runs the student at other parameter values; its "
                f"engine ({type(self.student).__name__}) does not implement InfluencePasses"
            )
        self.fused_head = fused_head
        # role -> why it takes full logits although fused_head asked otherwise (decoders)
        self.full_logits: dict[str, str] = {}
        self.hidden = HiddenKD(spec, self.teacher.module, self.student.module)
        self.telemetry = Telemetry()  # what the current step measures (see step())
        self.method: Method = method_cls(self)
        self.onpolicy: OnPolicy | None = None  # sampled completions (method.lmbda, seq_kd)
        # the teacher's terms on a sampled step (its CE on the data set's rows); None off-policy
        self.gold_anchor: GoldAnchor | None = None
        if self.config.generates or tokenizer is not None:
            if tokenizer is None:
                raise ConfigError(
                    "method.lmbda > 0 or method.seq_kd: on-policy steps generate, so the "
                    "Distiller needs the run's tokenizer (tokenizer=...)"
                )
            self.onpolicy = OnPolicy(self, tokenizer, seed=seed, rank=_rank())
        if self.task is not None:
            self._task_ready()

    @property
    def hp(self) -> MethodSection:
        """The method section (``config``); kept for code written against 0.9."""
        return self.config

    def _task_ready(self) -> None:
        """Once the task is known: the method's checks of it, the fused head where it applies."""
        self.method.check_task(self.task)
        engines = {"teacher": self.teacher, "student": self.student}
        why = enable_fused_head(self.task, type(self.method), engines, self.fused_head)
        self.full_logits = {role: reason for role, reason in why.items() if reason is not None}
        for role, reason in self.full_logits.items():
            msg = f"the {role} uses full logits, not the fused head: {reason}"
            warnings.warn(msg, FullLogitsWarning, stacklevel=3)

    # -- the objectives, with this run's hyper-parameters -------------------------------------
    def student_loss(self, student_logits, teacher_logits, labels):
        """``L_s = a_s KL_T(p_teacher || p_student) + (1 - a_s) task_loss`` (``jsd_beta`` picks
        the divergence: 0 forward KL, 1 reverse KL, between the two the generalised JSD)."""
        c = self.config
        return self._distill_loss(
            student_logits, teacher_logits, labels, c.alpha_student, c.jsd_beta
        )

    def teacher_loss(self, teacher_logits, student_logits, labels):
        """``L_t = a_t KL_T(p_student || p_teacher) + (1 - a_t) task_loss``: the teacher's
        distillation term treats the *student's* prediction as the target."""
        c = self.config
        return self._distill_loss(
            teacher_logits, student_logits, labels, c.alpha_teacher, c.teacher_beta
        )

    def _distill_loss(self, logits, target_logits, labels, alpha: float, beta: float):
        return self.task.distill_loss(
            logits,
            target_logits,
            labels,
            alpha=alpha,
            temperature=self.config.temperature,
            scale_by_t2=self.config.scale_by_t2,
            beta=beta,
        )

    # -- stepping ------------------------------------------------------------------------------
    def step(
        self,
        batch,
        quiz_batch=None,
        *,
        example_stats: bool = False,
        influence_ratio: bool = False,
    ) -> dict:
        """One full step: teacher update (if the method trains it), then student update.

        ``batch`` / ``quiz_batch``: a dict of tensors, or a list of micro-batch dicts whose length
        is the engines' gradient accumulation steps. Returns losses (floats) and, for LGTM, the
        per-example ``influence`` of the batch (CPU tensor, examples of all micro-batches
        concatenated, this rank's) and the ``influence_scale`` in effect. LGTM telemetry:
        ``example_stats`` adds ``example_stats`` = ``{"teacher_<stat>": [B], "student_<stat>":
        [B]}`` (``Task.example_stat`` of both models at theta, e.g. ``p_gold``);
        ``influence_ratio`` adds ``influence_ratio`` = ``|eta grad h| / |grad L_t|`` over the
        teacher's parameters (global batch; costs one teacher forward and two backwards).
        """
        micro = as_list(batch)
        self.resolve_task(micro[0])
        if len(micro) != self.student.gradient_accumulation_steps:
            raise ConfigError(
                f"got {len(micro)} micro-batches, but the engines accumulate "
                f"{self.student.gradient_accumulation_steps}"
            )
        if self.method.needs_quiz and quiz_batch is None:
            raise ConfigError(f"method {self.method.name!r} needs a quiz_batch (held-out data)")
        quiz = as_list(quiz_batch) if quiz_batch is not None else None
        self.telemetry = Telemetry(example_stats, influence_ratio)
        extra, config = {}, self.config
        if self.onpolicy is not None:
            gold = micro
            micro, extra, who = self.onpolicy.prepare(micro)
            if who is not None:  # the objective on sampled completions (methods/onpolicy.py)
                self.config = self.onpolicy.config
                if self.method.trains_teacher:
                    kd_scale, ce_weight = type(self.method).teacher_gold_terms(config)
                    w_gold = self.method.row_weights(gold)[0] if ce_weight else [1.0] * len(gold)
                    self.gold_anchor = GoldAnchor(gold, w_gold, kd_scale, ce_weight)
        t0 = time.perf_counter()
        try:
            metrics = self.method.step(micro, quiz)
            anchor = self.gold_anchor
            if anchor is not None and anchor.ce_weight:
                metrics["teacher_gold_ce"] = anchor.ce_total / len(micro)
        finally:
            self.telemetry = Telemetry()
            self.config = config
            self.gold_anchor = None
        if self.onpolicy is not None:  # training throughput beside generation's
            tokens = sum(int(mb["attention_mask"].sum()) for mb in micro)  # note: host sync
            extra["train_tokens_per_s"] = tokens / (time.perf_counter() - t0)
        return {**metrics, **extra}

    def teacher_finetune_step(self, batch) -> dict:
        """A teacher-only step on its task loss (vanilla KD's stage 1)."""
        micro = as_list(batch)
        self.resolve_task(micro[0])
        return self.method.teacher_finetune_step(micro)

    def resolve_task(self, batch: dict) -> None:
        """With ``task=None``: pick the task type from a batch's ``labels`` (once)."""
        if self.task is None:
            self.task = task_from_batch(batch)
            self._task_ready()


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _engine(model, optimizer, scheduler, role: str, **kw) -> Engine:
    if isinstance(model, Engine):
        return model
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{role} must be an nn.Module or an Engine, got {type(model).__name__}")
    return TorchEngine(model, optimizer, scheduler, **kw)
