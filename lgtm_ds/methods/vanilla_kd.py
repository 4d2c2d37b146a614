"""Vanilla KD: the teacher is fine-tuned on its own task loss first, then frozen."""

from __future__ import annotations

from .base import METHODS, Method


@METHODS.register
class VanillaKD(Method):
    name = "vanilla_kd"
    summary = "stage 1: teacher fine-tuned on its task loss; stage 2: teacher frozen, student L_s"
    trains_teacher = False
    teacher_stage1 = True
