"""``Distiller``: a method, two engines and a task, stepped together."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..engines.base import Engine, TorchEngine
from ..engines.head import enable_fused_head
from ..errors import ConfigError
from ..tasks import Task, get_task
from .base import METHODS, DistillHParams, Method, Telemetry
from .hidden import HiddenKD, HiddenSpec, attach_projection


def as_list(batch) -> list[dict]:
    """A batch dict, or a list of micro-batch dicts -> a list of micro-batch dicts."""
    return list(batch) if isinstance(batch, list | tuple) else [batch]


class Distiller:
    """Runs one distillation method step by step on a teacher and a student.

    ``teacher`` / ``student`` are :class:`Engine` objects (the DeepSpeed adapters) or plain
    ``nn.Module`` s, which are wrapped in :class:`TorchEngine` with ``teacher_optimizer`` /
    ``student_optimizer`` (torch optimizers; AdamW for an LGTM student). ``task`` is a task type
    name (``"classification"``, ``"regression"``, ``"causal_lm"``) or a :class:`Task`; None picks
    it from the first batch: ``labels`` of shape [B, L] (-100 = ignored) is a causal-LM batch,
    [B] a classification batch (regression must be named). ``eta`` of the LGTM
    influence term is the teacher optimizer's current learning rate. ``fused_head`` (decoders):
    the losses from hidden states through the output layer, chunk by chunk (``engines/head.py``;
    a ConfigError if a model's logits are not its output layer; MetaDistil: full logits).
    """

    def __init__(
        self,
        method: str = "lgtm",
        *,
        teacher: nn.Module | Engine,
        student: nn.Module | Engine,
        task: str | Task | None = None,
        teacher_optimizer=None,
        student_optimizer=None,
        alpha_student: float = 1.0,
        alpha_teacher: float = 0.4,
        temperature: float = 1.0,
        fd_radius: float = 1e-2,
        scale_by_t2: bool = False,
        jsd_beta: float = 0.0,
        teacher_jsd_beta: float | None = None,
        influence_scale: float = 1.0,
        influence_ratio_target: float | None = None,
        pilot_lr: float | None = None,
        teacher_ce_weight: float = 0.0,
        hidden_weight: float = 0.0,
        hidden_layers: list[str] | None = None,
        hidden_loss: str = "mse",
        hidden_positions: str = "all",
        teacher_scheduler=None,
        student_scheduler=None,
        gradient_accumulation_steps: int = 1,
        max_grad_norm: float = 0.0,
        fused_head: bool = False,
    ):
        method_cls = METHODS.get(method)
        if not fd_radius > 0:
            raise ConfigError(f"fd_radius must be > 0, got {fd_radius}")
        for key, beta in (("jsd_beta", jsd_beta), ("teacher_jsd_beta", teacher_jsd_beta)):
            if beta is not None and not 0.0 <= beta <= 1.0:
                raise ConfigError(f"{key} must be in [0, 1], got {beta}")
        self.hp = DistillHParams(
            alpha_student,
            alpha_teacher,
            temperature,
            fd_radius,
            scale_by_t2,
            jsd_beta,
            teacher_jsd_beta,
            influence_scale,
            influence_ratio_target,
            pilot_lr,
            teacher_ce_weight,
            hidden_weight,
            hidden_layers,
            hidden_loss,
            hidden_positions,
        )
        self.task: Task | None = get_task(task)() if isinstance(task, str) else task
        spec = HiddenSpec.of(self.hp)
        if not isinstance(student, Engine) and not isinstance(teacher, Engine):
            # plain modules: the projections (if the widths differ) join the student optimizer
            new = attach_projection(student, teacher, spec)
            if new and student_optimizer is not None:
                student_optimizer.add_param_group({"params": new})
        wrap = dict(gradient_accumulation_steps=gradient_accumulation_steps)
        wrap["max_grad_norm"] = max_grad_norm
        self.teacher = _engine(teacher, teacher_optimizer, teacher_scheduler, "teacher", **wrap)
        self.student = _engine(student, student_optimizer, student_scheduler, "student", **wrap)
        if fused_head and method_cls.fused_head:  # decoders: losses from hidden states
            if self.task is None or not self.task.fused_head:
                raise ConfigError("fused_head=True needs a decoder task (task='causal_lm')")
            engines = {"teacher": self.teacher, "student": self.student}
            for role, why in enable_fused_head(self.task, method_cls, engines).items():
                if why is not None:
                    raise ConfigError(f"fused_head=True: the {role} cannot use it: {why}")
        self.hidden = HiddenKD(spec, self.teacher.module, self.student.module)
        self.telemetry = Telemetry()  # what the current step measures (see step())
        self.method: Method = method_cls(self)

    @classmethod
    def from_config(cls, method_cfg: Any, *, teacher: Engine, student: Engine, task: Task):
        """From the ``method`` section of an experiment config (the trainer, the benchmarks)."""
        hp = DistillHParams.from_config(method_cfg)
        return cls(method_cfg.name, teacher=teacher, student=student, task=task, **vars(hp))

    # -- the objectives, with this run's hyper-parameters -------------------------------------
    def student_loss(self, student_logits, teacher_logits, labels):
        """``L_s = a_s KL_T(p_teacher || p_student) + (1 - a_s) task_loss`` (``jsd_beta`` picks
        the divergence: 0 forward KL, 1 reverse KL, between the two the generalised JSD)."""
        hp = self.hp
        return self._distill_loss(
            student_logits, teacher_logits, labels, hp.alpha_student, hp.jsd_beta
        )

    def teacher_loss(self, teacher_logits, student_logits, labels):
        """``L_t = a_t KL_T(p_student || p_teacher) + (1 - a_t) task_loss``: the teacher's
        distillation term treats the *student's* prediction as the target."""
        hp = self.hp
        return self._distill_loss(
            teacher_logits, student_logits, labels, hp.alpha_teacher, hp.teacher_beta
        )

    def _distill_loss(self, logits, target_logits, labels, alpha: float, beta: float):
        return self.task.distill_loss(
            logits,
            target_logits,
            labels,
            alpha=alpha,
            temperature=self.hp.temperature,
            scale_by_t2=self.hp.scale_by_t2,
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
        try:
            return self.method.step(micro, quiz)
        finally:
            self.telemetry = Telemetry()

    def teacher_finetune_step(self, batch) -> dict:
        """A teacher-only step on its task loss (vanilla KD's stage 1)."""
        micro = as_list(batch)
        self.resolve_task(micro[0])
        return self.method.teacher_finetune_step(micro)

    def resolve_task(self, batch: dict) -> None:
        """With ``task=None``: pick the task type from a batch's ``labels`` (once)."""
        if self.task is None:
            labels = batch["labels"]
            self.task = get_task("causal_lm" if labels.dim() == 2 else "classification")()


def _engine(model, optimizer, scheduler, role: str, **kw) -> Engine:
    if isinstance(model, Engine):
        return model
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{role} must be an nn.Module or an Engine, got {type(model).__name__}")
    return TorchEngine(model, optimizer, scheduler, **kw)
