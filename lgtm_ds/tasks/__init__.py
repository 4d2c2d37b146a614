"""Task types, by name: ``get_task("classification")``. One module per task type.

- ``classification``: sequence classifiers (``AutoModelForSequenceClassification``): KL
  distillation at temperature T, cross-entropy, accuracy / F1 / Matthews.
- ``regression``: one-output heads (GLUE stsb, float labels): squared-error distillation and
  loss, Pearson / Spearman.
- ``causal_lm``: decoders (``AutoModelForCausalLM``) at token level: KL / reverse KL / JSD
  distillation and next-token CE over the valid (shifted, unmasked) tokens; held-out CE,
  perplexity, top-1 agreement and the teacher-student KL. Its data formats (text, prompt +
  completion, chat messages) are in ``lm_data``.
"""

from ..errors import ConfigError
from . import causal_lm, classification  # noqa: F401  (registers the task types)
from .base import TASKS, Task

get_task = TASKS.get


def task_names() -> tuple[str, ...]:
    return TASKS.names()


__all__ = ["TASKS", "Task", "get_task", "task_for_labels", "task_from_batch", "task_names"]


def task_for_labels(kind: str) -> type[Task]:
    """The first registered task type that reads labelled examples of this ``kind``
    (``"classes"`` or ``"values"``): what ``data.task_type: null`` means for a source's labels."""
    for _, cls in TASKS.items():
        if cls.reads == "labels" and cls.labels == kind:
            return cls
    raise ConfigError(f"no task type reads {kind} labels; set data.task_type")


def task_from_batch(batch: dict) -> Task:
    """The first registered task type whose :meth:`Task.claims_batch` takes this batch (a
    ``Distiller`` without a named task: the built-in ``causal_lm`` takes labels [B, L],
    ``classification`` labels [B]); a ConfigError if none does."""
    for _, cls in TASKS.items():
        if cls.claims_batch(batch):
            return cls()
    raise ConfigError(
        f"no task type recognises a batch with labels of shape {tuple(batch['labels'].shape)}; "
        f"name it: task= one of {', '.join(TASKS.names())}"
    )
