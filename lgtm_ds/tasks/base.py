"""A task type's contract: how examples become model inputs, which model head, the per-row
distillation and task losses, the LGTM teacher logit gradient, and the metrics.

A *row* is the unit the losses average over: one example for sequence classification. Methods
(``lgtm_ds.methods``) only call the functions below, so a new task type is one module here,
registered with ``@TASKS.register``; the trainer asks ``get_task(name)`` and never branches on it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, ModelError
from ..registry import Registry
from .metrics import compute_metrics, primary_metric

TASKS: Registry[Task] = Registry("task type", "task type")

# The training split's column (and batch key) holding each row's index in the source's training
# data: encoders keep it, collators pass it on, models never see it (``model_inputs``). The
# influence telemetry names examples by it.
SOURCE_INDEX = "source_index"


@dataclass(frozen=True)
class ModelOptions:
    """How the trainer wants a model built (``model.*`` and ``train.seed``)."""

    vocab_size: int  # the tokenizer's (embedded models are built for it)
    dropout: float | None = None  # None: the model's own; else hidden/attention/head dropout
    zero_init_head: bool = False  # zero the final projection of the head (the LGTM reference)
    seed: int = 0  # initialisation of embedded models and new heads (per role)
    pad_token_id: int | None = None  # the tokenizer's (embedded decoders carry them)
    bos_token_id: int | None = None
    eos_token_id: int | None = None


@dataclass(frozen=True)
class InfluenceParams:
    """The scalars of one LGTM step's teacher logit gradient."""

    alpha_teacher: float
    temperature: float
    eta: float  # the teacher's learning rate this step
    radius: float  # R = r / ||v||
    scale_by_t2: bool = False
    beta_teacher: float = 0.0  # divergence of the teacher's KD term (0: forward KL)
    beta_student: float = 0.0  # divergence of the student's KD term (the influence's l_i)


@dataclass
class TeacherPass:
    """What LGTM's step D takes from one micro-batch (:meth:`Task.lgtm_teacher_pass`)."""

    grad: Any  # dL/dz (split: the part without the influence term, computed with eta = 0)
    influence: torch.Tensor  # per example (fp32)
    loss: torch.Tensor  # the teacher's own loss L_t(z; s) at theta, the micro-batch mean
    term: Any = None  # split: the influence part of dL/dz alone (fp32)


class Task:
    """One task type. Instances carry the label space and the metrics of one dataset."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    default_metrics: ClassVar[tuple[str, ...]] = ()
    # which offline tokenizer "embedded" means for this task type: "wordpiece" (BERT-style
    # encoders) or "decoder" (BOS/EOS, chat template)
    embedded_tokenizer: ClassVar[str] = "wordpiece"
    # What the data sources deliver for this task type (lgtm_ds.data.sources asks, never the
    # name): "labels" = text columns and one label per example; "text" = the decoder formats
    # of lm_data (text / prompt_completion / messages), no label column.
    reads: ClassVar[str] = "labels"
    # with reads "labels": "classes" (any values, mapped to contiguous ids) or "values" (real
    # numbers). With data.task_type null the labels pick the first task type registered for
    # their kind (classification / regression)
    labels: ClassVar[str | None] = "classes"
    # evaluation may complete prompts (train.eval_generate: greedy generation)
    generates: ClassVar[bool] = False
    # the first position summarises the sequence ([CLS]: method.hidden_positions=first applies)
    first_token_summarises: ClassVar[bool] = True
    lower_is_better: ClassVar[frozenset[str]] = frozenset()  # metrics where smaller is better
    # what :meth:`example_stat` measures (a column of the influence telemetry, per model)
    example_stat_name: ClassVar[str] = "p_gold"
    # every loss, gradient and evaluation function takes an engines.head.HeadOutput (hidden
    # states + output layer) in place of logits: engines may then skip the full logits
    fused_head: ClassVar[bool] = False

    def head_matches(self, module: nn.Module) -> str | None:
        """None if ``module``'s logits are its output layer on its body's last hidden states
        (so a HeadOutput may stand for them), else the reason they are not."""
        return "the task type has no fused head"

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

    @classmethod
    def claims_batch(cls, batch: dict) -> bool:
        """Whether a batch with no named task is this task type's (``Distiller(task=None)``
        asks the registered types in order); none by default."""
        return False

    # -- data ----------------------------------------------------------------------------------
    def encode(self, ds, tokenizer, *, text_columns: Sequence[str], max_length: int):
        """Tokenize a dataset of raw examples (text columns + ``label``) into model inputs +
        ``labels``, truncated to ``max_length``, unpadded (the collator pads per batch)."""
        raise NotImplementedError

    def collator(self, tokenizer, pad_to_multiple_of: int | None = None) -> Callable:
        """``rows -> dict of tensors`` for a DataLoader."""
        raise NotImplementedError

    def prepare_tokenizer(self, tokenizer) -> None:
        """Adjust the run's tokenizer before encoding (e.g. a pad token); nothing by default."""

    def count_rows(self, batch: dict) -> int:
        """The rows a batch's losses average over (one per example here; valid tokens for
        causal LMs). Methods weight each micro-batch by its share of the global count, so that
        a step's loss is ``sum over rows / rows in the global batch`` (all micro-batches, all
        ranks) however the rows are spread."""
        return int(batch["labels"].shape[0])

    # -- models ----------------------------------------------------------------------------------
    def build_model(self, name_or_path: str, *, role: str, options: ModelOptions) -> nn.Module:
        """The model for ``role`` ("teacher" / "student") from a hub name, a local folder or
        an ``embedded:<size>`` name (built from a config, no download)."""
        raise NotImplementedError

    def check_pair(self, teacher: nn.Module, student: nn.Module, t_name: str, s_name: str):
        """ModelError if the two models cannot be distilled into each other."""

    def check_tokenizers(self, tokenizer, own, tok_name: str, role: str, name: str) -> None:
        """ModelError unless ``own`` (the tokenizer saved with model ``name`` of ``role``; None:
        nothing to compare) maps every string to the same id as the run's ``tokenizer``
        (``tok_name``): distillation compares the two models' outputs id by id."""
        if own is None:
            return
        a, b = tokenizer.get_vocab(), own.get_vocab()
        diff = sorted(t for t in a.keys() | b.keys() if a.get(t) != b.get(t))
        if diff:
            ex = diff[0]
            raise ModelError(
                f"the tokenizers of {tok_name!r} ({len(a)} tokens, the run's) and {role} "
                f"{name!r} ({len(b)} tokens) differ: {len(diff)} strings map to different ids "
                f"(e.g. {ex!r}: {a.get(ex)} vs {b.get(ex)}); teacher and student must share one "
                f"vocabulary"
            )

    # -- losses ----------------------------------------------------------------------------------
    def kd_per_row(
        self,
        logits: torch.Tensor,
        target_logits: torch.Tensor,
        temperature: float,
        beta: float = 0.0,
        differentiable: bool = False,
    ) -> torch.Tensor:
        """Per-row divergence of ``logits`` from the (detached) ``target_logits``; ``beta``
        picks the divergence where the task has several (0 = forward KL). ``differentiable``:
        plain torch ops, twice differentiable and with a gradient to ``target_logits`` too
        (MetaDistil's meta-gradient) instead of the fused kernel."""
        raise NotImplementedError

    def kd_per_example(
        self,
        logits: torch.Tensor,
        target_logits: torch.Tensor,
        labels: torch.Tensor,
        temperature: float,
        beta: float = 0.0,
    ) -> torch.Tensor:
        """Per-example KD loss [B] (an example is a row here; a causal LM sums its tokens)."""
        return self.kd_per_row(logits, target_logits, temperature, beta)

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The supervised loss against the labels, averaged over rows."""
        raise NotImplementedError

    # A class whose closed-form ``lgtm_logit_grad`` assumes its own ``task_loss`` sets this to
    # True in its body; a subclass that overrides ``task_loss`` without it gets the LGTM logit
    # gradient of its loss by autograd (or a clear error where the task has no such path).
    task_loss_closed_form = False

    def task_loss_is_closed_form(self) -> bool:
        """Whether :meth:`task_loss` is the loss this class's closed-form LGTM logit gradient
        was derived for: the class that defines ``task_loss`` declares it in its own body."""
        owner = next(k for k in type(self).__mro__ if "task_loss" in vars(k))
        return bool(vars(owner).get("task_loss_closed_form", False))

    def check_for_lgtm(self) -> None:
        """Raise if LGTM's teacher gradient cannot be exact for this task (called when an LGTM
        method is built, before any step); nothing by default."""

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
        beta: float = 0.0,
        differentiable: bool = False,
    ) -> torch.Tensor:
        """``alpha * kd_scale * KD(target || model) + (1 - alpha) * task_loss``
        (``differentiable``: see :meth:`kd_per_row`).

        The student's objective ``L_s`` with ``alpha_student`` and the teacher's logits as the
        target; the teacher's ``L_t`` with ``alpha_teacher`` and the *student's* logits."""
        loss = logits.new_zeros((), dtype=torch.promote_types(logits.dtype, torch.float32))
        if alpha > 0:
            extra = {"differentiable": True} if differentiable else {}  # older tasks: no kw
            kd = self.kd_per_row(logits, target_logits, temperature, beta, **extra).mean()
            loss = loss + alpha * self.kd_scale(temperature, scale_by_t2) * kd
        if alpha < 1:
            loss = loss + (1 - alpha) * self.task_loss(logits, labels)
        return loss

    def _kd_grads(self, z, targets, p: InfluenceParams) -> list[torch.Tensor]:
        """``d/dz sum_rows KD_beta_teacher(target || z)`` for each target (fp32/fp64 autograd)."""
        z_ = z.detach().to(torch.promote_types(z.dtype, torch.float32)).requires_grad_()
        out = []
        with torch.enable_grad():
            for t in targets:
                kd = self.kd_per_row(z_, t.detach().to(z_.dtype), p.temperature, p.beta_teacher)
                out.append(torch.autograd.grad(kd.sum(), z_)[0])
        return out

    def lgtm_logit_grad(self, z, s, s_plus, s_minus, labels, p: InfluenceParams, n_rows=None):
        """(dL/dz of the LGTM teacher objective, per-row influence) from the teacher logits ``z``
        [N, C] and the student logits at theta (``s``) and theta +- R v (tensors of ``z``'s
        shape; ``labels`` [N]; ``n_rows`` the normaliser ``n``, default N): docs/algorithm.md,
        Eq. (8) and (9), for any task whose losses are means over rows of its logits. Here by
        autograd on the logits, the KD gradients at the student's theta, theta + R v and
        theta - R v (task types override it with closed forms and fused kernels: the
        classifier's forward KL in one pass). ``dL/dz = a k g(s)/n + (1 - a) dCE/dz
        - eta a k (g(s+) - g(s-)) / (2 R n)``, ``g(t) = d/dz sum KD(t || z)``, ``k`` = T^2 or 1.
        Influence ``-eta k (l(+) - l(-)) / (2R)``, ``l`` the student's per-row KD loss."""
        dtype = torch.promote_types(z.dtype, torch.float32)
        n, a = n_rows or z.shape[0], float(p.alpha_teacher)
        k = self.kd_scale(p.temperature, p.scale_by_t2)
        g_s, g_plus, g_minus = self._kd_grads(z, (s, s_plus, s_minus), p)
        z_ = z.detach().to(dtype).requires_grad_()
        with torch.enable_grad():
            g_ce = torch.autograd.grad(self.task_loss(z_, labels), z_)[0]
        g_ce = g_ce * (z.shape[0] / n)  # task_loss is a mean over the rows here
        grad = (a * k / n) * g_s + (1 - a) * g_ce
        grad = grad - (p.eta * a * k / (2 * p.radius * n)) * (g_plus - g_minus)
        zt = z.detach().to(dtype)
        with torch.no_grad():
            l_plus = self.kd_per_row(s_plus.detach().to(dtype), zt, p.temperature, p.beta_student)
            l_minus = self.kd_per_row(s_minus.detach().to(dtype), zt, p.temperature, p.beta_student)
        influence = -p.eta * k * (l_plus - l_minus) / (2 * p.radius)
        return grad.to(z.dtype), influence

    def meta_logit_grad(
        self,
        z,
        s,
        u,
        labels: torch.Tensor,
        *,
        coef: float,
        alpha: float,
        temperature: float,
        scale_by_t2: bool = False,
        beta: float = 0.0,
    ):
        """MetaDistil: ``coef * d/dz < d L_s(s; z) / ds, u >``, the mixed second derivative of
        the student's objective (:meth:`distill_loss`, the teacher's logits ``z`` the target)
        along the student's logit tangent ``u``, by autograd in logit space. Returns ``(dz``
        (fp32, float64 stays), ``||dz||^2)``."""
        dtype = torch.promote_types(s.dtype, torch.float32)
        z_ = z.detach().to(dtype).requires_grad_()
        s_ = s.detach().to(dtype).requires_grad_()
        with torch.enable_grad():
            loss = self.distill_loss(
                s_,
                z_,
                labels,
                alpha=alpha,
                temperature=temperature,
                scale_by_t2=scale_by_t2,
                beta=beta,
                differentiable=True,
            )
            (gs,) = torch.autograd.grad(loss, s_, create_graph=True)
            (dz,) = torch.autograd.grad((gs * u.detach().to(dtype)).sum(), z_)
        dz = coef * dz
        return dz, float(dz.double().pow(2).sum())

    def influence_logit_term(
        self,
        s_plus: torch.Tensor,
        s_minus: torch.Tensor,
        p: InfluenceParams,
        z: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        n_rows: int | None = None,
    ) -> torch.Tensor:
        """The influence part of dL/dz alone (fp32), for low-precision teachers: Eq. (8)'s last
        term, ``-eta a_t k (g(s+) - g(s-)) / (2 R n)`` by autograd on the teacher logits ``z``
        (``labels`` for tasks whose rows depend on them; ``n_rows``: ``n``, default the rows)."""
        n = n_rows or s_plus.shape[0]
        k = self.kd_scale(p.temperature, p.scale_by_t2)
        g_plus, g_minus = self._kd_grads(z, (s_plus, s_minus), p)
        return (-p.eta * p.alpha_teacher * k / (2 * p.radius * n)) * (g_plus - g_minus)

    def lgtm_teacher_pass(
        self,
        z: torch.Tensor,
        s: torch.Tensor,
        s_plus: torch.Tensor,
        s_minus: torch.Tensor,
        labels: torch.Tensor,
        p: InfluenceParams,
        *,
        split: bool = False,
    ) -> TeacherPass:
        """All LGTM's step D needs from one micro-batch's logits: dL/dz, the influence and the
        teacher's loss ``L_t(z; s)`` (reported). ``split`` (low-precision teachers): ``grad`` is
        dL/dz with ``eta = 0`` (bitwise what it is without the influence term) and ``term``
        the influence part alone. This composes :meth:`lgtm_logit_grad`,
        :meth:`influence_logit_term` and :meth:`distill_loss`; tasks with large outputs
        override it with one pass over the logits (``CausalLMTask``: one chunked pass)."""
        grad, influence = self.lgtm_logit_grad(z, s, s_plus, s_minus, labels, p)
        term = None
        if split:
            no_eta = dataclasses.replace(p, eta=0.0)
            grad, _ = self.lgtm_logit_grad(z, s, s_plus, s_minus, labels, no_eta)
            term = self.influence_logit_term(s_plus, s_minus, p, z=z, labels=labels)
        return TeacherPass(grad, influence, self.teacher_loss_value(z, s, labels, p), term)

    @torch.no_grad()
    def teacher_loss_value(self, z, s, labels, p: InfluenceParams) -> torch.Tensor:
        """``L_t(z; s)`` (:meth:`distill_loss` with the teacher's ``alpha``/``beta``), no graph."""
        return self.distill_loss(
            z.detach(),
            s,
            labels,
            alpha=p.alpha_teacher,
            temperature=p.temperature,
            scale_by_t2=p.scale_by_t2,
            beta=p.beta_teacher,
        )

    @torch.no_grad()
    def example_stat(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per example [B] (fp32), how well a model does on its label, for the influence
        telemetry: the probability of the gold label here (NaN where the label is ignored)."""
        p = torch.softmax(logits.float(), -1)
        y = labels.long()
        gold = p.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return torch.where(y >= 0, gold, torch.full_like(gold, float("nan")))

    # -- evaluation -------------------------------------------------------------------------------
    def predictions(self, logits: torch.Tensor) -> np.ndarray:
        """What evaluation keeps of a batch's logits (gathered over ranks, then scored)."""
        return logits.float().cpu().numpy()

    def compute_metrics(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        return compute_metrics(self.metric_names, predictions, labels)

    def eval_rows(self, logits: dict[str, torch.Tensor], batch: dict) -> dict[str, np.ndarray]:
        """Per example of an eval batch, what scoring needs, by key (one array row per example;
        the trainer gathers them over ranks by example index). ``logits``: role -> logits."""
        return {role: self.predictions(z) for role, z in logits.items()}

    def score(self, rows: dict[str, np.ndarray], labels: list) -> dict[str, float]:
        """``role/metric`` values from the gathered :meth:`eval_rows` of the whole eval split."""
        y = np.asarray(labels)
        return {
            f"{role}/{k}": v
            for role, preds in rows.items()
            for k, v in self.compute_metrics(preds, y).items()
        }

    @property
    def primary_metric(self) -> str:
        return primary_metric(self.metric_names)
