"""A distillation method's contract, and the pieces every method shares.

A method is one module in ``lgtm_ds/methods/``: a :class:`Method` subclass that says what it
needs (quiz batches? does the teacher learn? a teacher-only first stage?), checks its own
configuration, and implements the teacher's part of a step; registered with
``@METHODS.register``. The trainer, the config and the launch scripts ask the registry.

Methods talk to :class:`~lgtm_ds.engines.base.Engine` objects and to the task
(:class:`~lgtm_ds.tasks.base.Task`) only: no DeepSpeed, Triton, wandb or YAML imports here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from pydantic import Field

from ..errors import ConfigError, DataError
from ..options import Options
from ..registry import Registry

if TYPE_CHECKING:
    from ..config import ExperimentConfig
    from ..engines.base import Engine
    from ..tasks.base import Task
    from .distiller import Distiller
    from .hidden import HiddenKD
    from .onpolicy import GoldAnchor

METHODS: Registry[Method] = Registry("method", "method.name")


class DistillOptions(Options):
    """The two objectives every method shares, ``method.*`` (see :meth:`Distiller.student_loss`
    and :meth:`Distiller.teacher_loss`): ``L_s = a_s KD_T(p_t || p_s) + (1 - a_s) CE`` and
    ``L_t = a_t KD_T(p_s || p_t) + (1 - a_t) CE`` (docs/algorithm.md, Eq. (1) and (2))."""

    alpha_student: float = Field(
        0.5,
        ge=0,
        le=1,
        description="weight of the KD term in the student loss (the rest is CE). 0.5 suits the "
        "default run, whose embedded teacher starts from random weights; with a fine-tuned "
        "teacher the paper and its reference implementation use 1.0 (configs/examples/"
        "glue_sst2.yaml)",
    )
    alpha_teacher: float = Field(
        0.4,
        ge=0,
        le=1,
        description="weight of the KD term in the teacher loss (the rest is its own CE)",
    )
    temperature: float = Field(1.0, gt=0, description="KD softmax temperature T")
    scale_by_t2: bool = Field(
        False, description="multiply the KD terms by T^2 (the reference does not)"
    )
    jsd_beta: float = Field(
        0.0,
        ge=0,
        le=1,
        description="the student's KD divergence: 0 = forward KL(teacher || student) (the "
        "paper's), 1 = reverse KL, in between the generalised JSD with mixture weight beta "
        "(TRL GKD / Liger convention)",
    )
    teacher_jsd_beta: float | None = Field(
        None,
        ge=0,
        le=1,
        description="the same for the teacher's KD term (the student's prediction is its "
        "target); null = jsd_beta",
    )

    @property
    def teacher_beta(self) -> float:
        return self.jsd_beta if self.teacher_jsd_beta is None else self.teacher_jsd_beta


@dataclass(frozen=True)
class Telemetry:
    """What one step measures beyond its losses (the trainer asks per step; methods without
    an influence term ignore it)."""

    example_stats: bool = False  # per example: each model's Task.example_stat at theta
    influence_ratio: bool = False  # |eta grad h| / |grad L_t| in the teacher's parameter space


class Method:
    """One distillation method, bound to a :class:`~lgtm_ds.methods.distiller.Distiller`."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""  # one line: what the teacher and the student optimise
    needs_quiz: ClassVar[bool] = False  # the step takes held-out quiz batches
    trains_teacher: ClassVar[bool] = True  # the teacher learns during distillation
    teacher_stage1: ClassVar[bool] = False  # a teacher-only fine-tuning stage comes first
    reports_influence: ClassVar[bool] = False  # step() returns the per-example "influence"
    # the step runs the student at other parameter values (its engine's InfluencePasses)
    student_passes: ClassVar[bool] = False
    # decoders: the losses may come from hidden states through the output layer, chunk by chunk
    # (engines/head.py); False: the engines give full logits (model.fused_head is ignored)
    fused_head: ClassVar[bool] = True
    # the method's own hyper-parameters: an Options model, the section method.<name> of the
    # experiment (methods/config.py collects them); None: it has none
    Options: ClassVar[type[Options] | None] = None
    # decoders: the step may train on sampled completions (method.lmbda, method.seq_kd;
    # methods/onpolicy.py)
    on_policy: ClassVar[bool] = True

    def __init__(self, distiller: Distiller):
        self.d = distiller

    @property
    def options(self):
        """This method's own hyper-parameters (``method.<name>``), or None."""
        return getattr(self.d.config, self.name) if self.Options is not None else None

    # -- configuration -------------------------------------------------------------------------
    @classmethod
    def check_config(cls, cfg: ExperimentConfig) -> None:
        """The method's own constraints on the experiment (ConfigError naming the key). Runs
        when the config is loaded."""

    @classmethod
    def prepare_ds_configs(cls, cfg: ExperimentConfig, teacher: dict, student: dict) -> None:
        """Check or adjust the resolved DeepSpeed dicts of both roles (in place), before any
        engine is built or any output written."""

    def check_task(self, task: Task) -> None:
        """Raise if this method cannot run exactly on ``task`` (once the task is known)."""

    @classmethod
    def refuse_fp16(cls, cfg: ExperimentConfig, reason: str, note: str = "") -> None:
        """``check_config`` helper: a ConfigError naming ``reason`` when the run is fp16."""
        if cfg.train.precision == "fp16":
            raise ConfigError(
                f"method {cls.name} with train.precision=fp16 is not supported yet: {reason}; "
                f"use bf16 or fp32{note}"
            )

    @classmethod
    def onpolicy_overrides(cls) -> dict:
        """On a step that trains on sampled completions, the method's own options changed for
        the step (``{section: {key: value}}``), e.g. a CE weight set to 0: the sampled tokens are
        no gold labels. The shared ``alpha_*`` are set to 1 for every method."""
        return {}

    @classmethod
    def teacher_gold_terms(cls, config) -> tuple[float, float]:
        """``(kd_scale, ce_weight)`` of the teacher's loss on a step that trains on sampled
        completions (``config``: the run's method section, not the step's): its KD term on the
        sampled sequences times ``kd_scale``, plus ``ce_weight`` times its CE on the data set's
        completions of the same prompts (:class:`~lgtm_ds.methods.onpolicy.GoldAnchor`).
        Default: ``(a_t, 1 - a_t)``, the off-policy ``L_t`` with its CE moved to the gold rows."""
        return config.alpha_teacher, 1.0 - config.alpha_teacher

    @classmethod
    def stage1_epochs(cls, cfg: ExperimentConfig) -> float:
        """Epochs of the teacher-only first stage (methods with ``teacher_stage1``)."""
        return 0.0

    @classmethod
    def influence_ratio_every(cls, cfg: ExperimentConfig) -> int:
        """Measure ``influence_ratio`` every N optimizer steps (0: never; methods with an
        influence term)."""
        return 0

    # -- state a resumed run needs (beyond the engines) ----------------------------------------
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # -- one step --------------------------------------------------------------------------------
    def row_weights(self, *groups: list[dict]) -> list[list[float]]:
        """For each list of micro-batches, each micro-batch's weight ``w_j = rows_j * len(group)
        / (mean over ranks of the group's row count on one rank)``.

        A micro-batch's loss is a mean over its rows; times ``w_j``, and with the engines
        dividing by the accumulation steps and averaging over ranks, the step's gradient is that
        of ``sum over rows / rows in the global batch``: micro 8 x accumulation 1 equals 4 x 2
        and 1 rank equals 2 ranks even when micro-batches hold different numbers of rows
        (tokens). Equal counts give exactly 1.0. One small all-reduce (none on one process)."""
        self.d.resolve_task(groups[0][0])  # Distiller(task=None): the first batch decides
        counts = [[self.d.task.count_rows(b) for b in g] for g in groups]
        local = torch.tensor(
            [float(sum(c)) for c in counts], dtype=torch.float64, device=device_of(self.d.student)
        )
        self.d.student.all_reduce_mean_([local])
        out = []
        for c, mean in zip(counts, local.tolist()):
            if mean <= 0:
                raise DataError(
                    "a global batch has no rows to learn from (every label is -100); check the "
                    "data's loss masks"
                )
            out.append([cj * len(c) / mean for cj in c])
        return out

    def teacher_update(self, micro: list[dict], quiz: list[dict] | None) -> dict:
        """The teacher's part of a step (nothing for a frozen teacher); returns metrics."""
        return {}

    def step(self, micro: list[dict], quiz: list[dict] | None) -> dict:
        """Teacher update, then the student update with the updated teacher.

        The divergence guard: a non-finite gradient (so any non-finite loss or influence behind
        it) or an fp16 overflow makes the engine skip its optimizer step, parameters and state
        untouched. A skip in the teacher's part (or a non-finite influence pass) skips the
        student's step too (``skipped = "both"``); a skip in the student's own update, after
        the teacher has stepped, is ``"student"``. The trainer counts and reports them."""
        self.d.hidden.pop_metrics()
        metrics = self.teacher_update(micro, quiz)
        if metrics.get("skipped") or (self.trains_teacher and self.d.teacher.step_skipped):
            metrics["skipped"] = "both"
            return metrics
        metrics.update(self.student_update(micro))
        metrics.update(self.d.hidden.pop_metrics())  # <role>_hidden_loss
        if self.d.student.step_skipped:
            metrics["skipped"] = "student"
        return metrics

    def student_update(self, micro: list[dict]) -> dict:
        """``L_s`` with the (updated) teacher's logits as the target, one engine step per
        micro-batch (the engine steps the optimizer at the accumulation boundary)."""
        d = self.d
        d.teacher.module.train(self.trains_teacher)  # a frozen teacher predicts in eval mode
        d.student.module.train()
        (w,) = self.row_weights(micro)
        loss = distill_update(d.student, d.teacher, micro, d.student_loss, w, d.hidden, "student")
        return {"student_loss": loss}

    def teacher_finetune_step(self, batch: list[dict]) -> dict:
        """A teacher-only step on its task loss (stage 1 of methods with ``teacher_stage1``)."""
        d = self.d
        d.teacher.module.train()
        (w,) = self.row_weights(batch)
        out = {"teacher_ce": task_update(d.teacher, d.task, batch, w)}
        if d.teacher.step_skipped:
            out["skipped"] = "teacher"
        return out


def distill_update(
    learner: Engine,
    target: Engine,
    micro: list[dict],
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    weights: list[float],
    hidden: HiddenKD | None = None,
    role: str = "student",
    anchor: GoldAnchor | None = None,
    task: Task | None = None,
) -> float:
    """For each micro-batch: ``target`` logits without graph, ``learner`` forward,
    ``loss_fn(logits, target_logits, labels)`` (+ the hidden-state term ``hidden``, usually
    ``Distiller.hidden``; ``role`` = the learner's: "student" / "teacher") times the
    micro-batch's row weight, backward, engine step. ``anchor`` (the teacher on a sampled step;
    ``task`` with it): the KD term scaled and the gold rows' CE added before the backward.
    Returns the mean weighted loss (this rank's share of the global mean)."""
    if hidden is None:
        from .hidden import HiddenKD, HiddenSpec

        hidden = HiddenKD(HiddenSpec(), None, None)  # off
    other = "teacher" if role == "student" else "student"
    total = 0.0
    for j, (mb, w) in enumerate(zip(micro, weights)):
        with torch.no_grad(), hidden.capture(other) as h_target:
            target_logits = target.forward(mb)
        with hidden.capture(role) as h_learner:
            logits = learner.forward(mb)
        loss = loss_fn(logits, target_logits, mb["labels"])
        if anchor is not None:
            loss = anchor.kd(loss)
        states = (h_learner, h_target) if role == "student" else (h_target, h_learner)
        loss = weighted(hidden.add(loss, *states, mb, role, share=1 / len(micro)), w)
        if anchor is not None:
            loss = loss + anchor.ce(j, learner, task)
        learner.backward(loss)
        learner.step()
        total += loss.detach()
    return float(total) / len(micro)  # note: host sync, once per step


def task_update(engine: Engine, task, micro: list[dict], weights: list[float]) -> float:
    """For each micro-batch: ``engine``'s own task loss (labels, no distillation) times its row
    weight, backward, engine step. Returns the mean weighted loss (this rank's share)."""
    total = 0.0
    for mb, w in zip(micro, weights):
        loss = weighted(task.task_loss(engine.forward(mb), mb["labels"]), w)
        engine.backward(loss)
        engine.step()
        total += loss.detach()
    return float(total) / len(micro)  # note: host sync, once per step


def weighted(loss: torch.Tensor, w: float) -> torch.Tensor:
    """``loss * w``; untouched (bit for bit) when ``w == 1``."""
    return loss if w == 1.0 else loss * w


def device_of(engine) -> torch.device:
    for p in engine.module.parameters():
        return p.device
    return torch.device("cpu")
