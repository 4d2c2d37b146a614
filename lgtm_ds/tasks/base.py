"""A task type's contract: how examples become model inputs, which model head, the per-row
distillation and task losses, the LGTM teacher logit gradient, and the metrics.

A *row* is the unit the losses average over: one example for sequence classification. Methods
(``lgtm_ds.methods``) only call the functions below, so a new task type is one module here,
registered with ``@TASKS.register``; the trainer asks ``get_task(name)`` and never branches on it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..registry import Registry
from .metrics import compute_metrics, primary_metric

TASKS: Registry[Task] = Registry("task type", "task type")


@dataclass(frozen=True)
class ModelOptions:
    """How the trainer wants a model built (``model.*`` and ``train.seed``)."""

    vocab_size: int  # the tokenizer's (embedded models are built for it)
    dropout: float | None = None  # None: the model's own; else hidden/attention/head dropout
    zero_init_head: bool = False  # zero the final projection of the head (the LGTM reference)
    seed: int = 0  # initialisation of embedded models and new heads (per role)


@dataclass(frozen=True)
class InfluenceParams:
    """The scalars of one LGTM step's teacher logit gradient."""

    alpha_teacher: float
    temperature: float
    eta: float  # the teacher's learning rate this step
    radius: float  # R = r / ||v||
    scale_by_t2: bool = False


class Task:
    """One task type. Instances carry the label space and the metrics of one dataset."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    default_metrics: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        *,
        num_labels: int | None = None,
        metric_names: Sequence[str] | None = None,
        label_names: Sequence[str] | None = None,
    ):
        self.num_labels = num_labels
        self.metric_names = list(metric_names or self.default_metrics)
        self.label_names = list(label_names) if label_names is not None else None
        if not self.metric_names:
            raise ConfigError(f"task type {self.name!r} needs at least one metric")

    # -- data ----------------------------------------------------------------------------------
    def encode(self, ds, tokenizer, *, text_columns: Sequence[str], max_length: int):
        """Tokenize a dataset of raw examples (text columns + ``label``) into model inputs +
        ``labels``, truncated to ``max_length``, unpadded (the collator pads per batch)."""
        raise NotImplementedError

    def collator(self, tokenizer, pad_to_multiple_of: int | None = None) -> Callable:
        """``rows -> dict of tensors`` for a DataLoader."""
        raise NotImplementedError

    # -- models ----------------------------------------------------------------------------------
    def build_model(self, name_or_path: str, *, role: str, options: ModelOptions) -> nn.Module:
        """The model for ``role`` ("teacher" / "student") from a hub name, a local folder or
        an ``embedded:<size>`` name (built from a config, no download)."""
        raise NotImplementedError

    def check_pair(self, teacher: nn.Module, student: nn.Module, t_name: str, s_name: str):
        """ModelError if the two models cannot be distilled into each other."""

    # -- losses ----------------------------------------------------------------------------------
    def kd_per_row(
        self, logits: torch.Tensor, target_logits: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        """Per-row divergence of ``logits`` from the (detached) ``target_logits``."""
        raise NotImplementedError

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The supervised loss against the labels, averaged over rows."""
        raise NotImplementedError

    def kd_scale(self, temperature: float, scale_by_t2: bool) -> float:
        """Factor on the KD term: ``T^2`` when ``scale_by_t2`` (softmax tasks), else 1."""
        return temperature**2 if scale_by_t2 else 1.0

    def distill_loss(
        self,
        logits: torch.Tensor,
        target_logits: torch.Tensor,
        labels: torch.Tensor,
        *,
        alpha: float,
        temperature: float,
        scale_by_t2: bool = False,
    ) -> torch.Tensor:
        """``alpha * kd_scale * KD(target || model) + (1 - alpha) * task_loss``.

        The student's objective ``L_s`` with ``alpha_student`` and the teacher's logits as the
        target; the teacher's ``L_t`` with ``alpha_teacher`` and the *student's* logits."""
        loss = logits.new_zeros((), dtype=torch.promote_types(logits.dtype, torch.float32))
        if alpha > 0:
            kd = self.kd_per_row(logits, target_logits, temperature).mean()
            loss = loss + alpha * self.kd_scale(temperature, scale_by_t2) * kd
        if alpha < 1:
            loss = loss + (1 - alpha) * self.task_loss(logits, labels)
        return loss

    def lgtm_logit_grad(
        self,
        z: torch.Tensor,
        s: torch.Tensor,
        s_plus: torch.Tensor,
        s_minus: torch.Tensor,
        labels: torch.Tensor,
        p: InfluenceParams,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(dL/dz of the LGTM teacher objective, per-row influence) from the teacher logits ``z``
        and the student logits at theta (``s``) and theta +- R v; see the subclasses."""
        raise NotImplementedError

    def influence_logit_term(
        self, s_plus: torch.Tensor, s_minus: torch.Tensor, p: InfluenceParams
    ) -> torch.Tensor:
        """The influence part of dL/dz alone (fp32), for low-precision teachers."""
        raise NotImplementedError

    # -- evaluation -------------------------------------------------------------------------------
    def predictions(self, logits: torch.Tensor) -> np.ndarray:
        """What evaluation keeps of a batch's logits (gathered over ranks, then scored)."""
        return logits.float().cpu().numpy()

    def compute_metrics(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        return compute_metrics(self.metric_names, predictions, labels)

    @property
    def primary_metric(self) -> str:
        return primary_metric(self.metric_names)
