"""Vanilla KD: the teacher is fine-tuned on its own task loss first, then frozen."""

from __future__ import annotations

from pydantic import Field

from ..options import Options
from .base import METHODS, Method


class VanillaKDOptions(Options):
    """vanilla_kd only: the teacher's fine-tuning stage."""

    teacher_stage1_epochs: float = Field(
        1.0,
        ge=0,
        description="epochs of teacher fine-tuning before distillation; 0 = distil from the "
        "teacher as loaded (one already fine-tuned), built without an optimizer",
    )


@METHODS.register
class VanillaKD(Method):
    name = "vanilla_kd"
    summary = "stage 1: teacher fine-tuned on its task loss; stage 2: teacher frozen, student L_s"
    trains_teacher = False
    teacher_stage1 = True
    Options = VanillaKDOptions

    @classmethod
    def stage1_epochs(cls, cfg) -> float:
        return getattr(cfg.method, cls.name).teacher_stage1_epochs
