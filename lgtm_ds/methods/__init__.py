"""Distillation methods, by name: ``get_method("lgtm")``. One module per method.

- ``vanilla_kd``: the teacher is fine-tuned first (stage 1), then frozen.
- ``online_kd``: the teacher learns from the student every step.
- ``lgtm``: the teacher's update is weighted by distillation influence.
- ``metadistil``: the teacher learns from a pilot student's quiz loss (exact second order).
- ``student_only``: no distillation, the student on its task loss (the baseline to beat).

Plus the pieces they share: ``base`` (the contract, the student update), ``distiller`` (the
object that steps a method on two engines), ``lookahead`` (the simulated AdamW step) and
``naive`` (the reference form of LGTM: a test oracle and a benchmark baseline).
"""

from . import lgtm, metadistil, online_kd, student_only, vanilla_kd  # noqa: F401  (registers the methods)
from .base import METHODS, DistillHParams, Method
from .distiller import Distiller

get_method = METHODS.get


def method_names() -> tuple[str, ...]:
    return METHODS.names()


__all__ = ["METHODS", "DistillHParams", "Distiller", "Method", "get_method", "method_names"]
