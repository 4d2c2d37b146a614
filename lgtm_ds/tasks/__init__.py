"""Task types, by name: ``get_task("classification")``. One module per task type.

- ``classification``: sequence classifiers (``AutoModelForSequenceClassification``): KL
  distillation at temperature T, cross-entropy, accuracy / F1 / Matthews.
- ``regression``: one-output heads (GLUE stsb, float labels): squared-error distillation and
  loss, Pearson / Spearman.
"""

from . import classification  # noqa: F401  (registers the task types)
from .base import TASKS, Task

get_task = TASKS.get


def task_names() -> tuple[str, ...]:
    return TASKS.names()


__all__ = ["TASKS", "Task", "get_task", "task_names"]
