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
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..registry import Registry

if TYPE_CHECKING:
    from ..config import ExperimentConfig
    from ..engines.base import Engine
    from .distiller import Distiller

METHODS: Registry[Method] = Registry("method", "method.name")


@dataclass(frozen=True)
class DistillHParams:
    """The ``method.*`` values a step uses (see ``lgtm_ds.config`` for their meaning)."""

    alpha_student: float = 1.0
    alpha_teacher: float = 0.4
    temperature: float = 1.0
    fd_radius: float = 1e-2
    scale_by_t2: bool = False

    @classmethod
    def from_config(cls, method_cfg: Any) -> DistillHParams:
        return cls(**{k: getattr(method_cfg, k) for k in cls.__dataclass_fields__})


class Method:
    """One distillation method, bound to a :class:`~lgtm_ds.methods.distiller.Distiller`."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""  # one line: what the teacher and the student optimise
    needs_quiz: ClassVar[bool] = False  # the step takes held-out quiz batches
    trains_teacher: ClassVar[bool] = True  # the teacher learns during distillation
    teacher_stage1: ClassVar[bool] = False  # a teacher-only fine-tuning stage comes first

    def __init__(self, distiller: Distiller):
        self.d = distiller

    # -- configuration -------------------------------------------------------------------------
    @classmethod
    def check_config(cls, cfg: ExperimentConfig) -> None:
        """The method's own constraints on the experiment (ConfigError naming the key). Runs
        when the config is loaded."""

    @classmethod
    def prepare_ds_configs(cls, cfg: ExperimentConfig, teacher: dict, student: dict) -> None:
        """Check or adjust the resolved DeepSpeed dicts of both roles (in place), before any
        engine is built or any output written."""

    # -- one step --------------------------------------------------------------------------------
    def teacher_update(self, micro: list[dict], quiz: list[dict] | None) -> dict:
        """The teacher's part of a step (nothing for a frozen teacher); returns metrics."""
        return {}

    def step(self, micro: list[dict], quiz: list[dict] | None) -> dict:
        """Teacher update, then the student update with the updated teacher. An overflow in the
        teacher (fp16) or a non-finite influence pass skips both engines' steps."""
        metrics = self.teacher_update(micro, quiz)
        if metrics.get("skipped") or (self.trains_teacher and self.d.teacher.step_skipped):
            metrics["skipped"] = True
            return metrics
        metrics.update(self.student_update(micro))
        return metrics

    def student_update(self, micro: list[dict]) -> dict:
        """``L_s`` with the (updated) teacher's logits as the target, one engine step per
        micro-batch (the engine steps the optimizer at the accumulation boundary)."""
        d = self.d
        d.teacher.module.train(self.trains_teacher)  # a frozen teacher predicts in eval mode
        d.student.module.train()
        return {"student_loss": distill_update(d.student, d.teacher, micro, d.student_loss)}

    def teacher_finetune_step(self, batch: list[dict]) -> dict:
        """A teacher-only step on its task loss (stage 1 of methods with ``teacher_stage1``)."""
        d = self.d
        d.teacher.module.train()
        total = 0.0
        for mb in batch:
            loss = d.task.task_loss(d.teacher.forward(mb), mb["labels"])
            d.teacher.backward(loss)
            d.teacher.step()
            total += loss.detach()
        return {"teacher_ce": float(total) / len(batch)}


def distill_update(
    learner: Engine,
    target: Engine,
    micro: list[dict],
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> float:
    """For each micro-batch: ``target`` logits without graph, ``learner`` forward,
    ``loss_fn(logits, target_logits, labels)``, backward, engine step. Returns the mean loss."""
    total = 0.0
    for mb in micro:
        with torch.no_grad():
            target_logits = target.forward(mb)
        loss = loss_fn(learner.forward(mb), target_logits, mb["labels"])
        learner.backward(loss)
        learner.step()
        total += loss.detach()
    return float(total) / len(micro)  # note: host sync, once per step
