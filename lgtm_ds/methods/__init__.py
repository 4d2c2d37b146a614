"""Distillation methods, by name: ``get_method("lgtm")``. One module per method.

- ``vanilla_kd``: the teacher is fine-tuned first (stage 1), then frozen.
- ``online_kd``: the teacher learns from the student every step.
- ``lgtm``: the teacher's update is weighted by distillation influence.
- ``metadistil``: the teacher learns from a pilot student's quiz loss (exact second order).
- ``student_only``: no distillation, the student on its task loss (the baseline to beat).

Plus the pieces they share: ``base`` (the contract, the student update, the shared objectives'
options), ``config`` (the experiment's ``method`` section, collected from the registry),
``distiller`` (the object that steps a method on two engines), ``lookahead`` (the simulated
AdamW step) and ``naive`` (the reference form of LGTM: a test oracle and a benchmark baseline).
"""

from . import lgtm, metadistil, online_kd, student_only, vanilla_kd  # noqa: F401  (registers)
from .base import METHODS, DistillOptions, Method
from .config import MethodSection, method_config, method_config_class
from .distiller import Distiller

get_method = METHODS.get


def method_names() -> tuple[str, ...]:
    return METHODS.names()


__all__ = [
    "METHODS",
    "DistillOptions",
    "Distiller",
    "Method",
    "MethodSection",
    "get_method",
    "method_config",
    "method_config_class",
    "method_names",
]
