"""Sequence classification and regression (one-output heads): GLUE-style tasks.

Conventions (docs/algorithm.md): ``KL_T(p || q)`` is the mean over rows of
``sum_c p_c (log p_c - log q_c)`` with both distributions ``softmax(logits / T)``; no T^2 factor
unless ``scale_by_t2``. Rows whose label is < 0 get no CE term; every mean divides by the number
of rows. The KD divergence and the fused teacher logit-gradient come from ``lgtm_kernels``
(Triton on CUDA, its torch reference on CPU); float64 inputs take a float64 torch formula (the
test oracle: the kernels compute in fp32).

Regression (one output, float labels, e.g. GLUE stsb): the KD divergence is the squared error
between the two predictions and the task loss the squared error to the label (no temperature);
the cheap LGTM form carries over with ``softmax(z/T) - q`` replaced by ``2(z - s)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import lgtm_kernels
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from . import hf
from .base import SOURCE_INDEX, TASKS, InfluenceParams, ModelOptions, Task, TeacherPass


@TASKS.register
class ClassificationTask(Task):
    name = "classification"
    summary = "sequence classifier: KL_T distillation + cross-entropy; accuracy / F1 / Matthews"
    default_metrics = ("accuracy",)
    problem_type: ClassVar[str | None] = None  # HF config.problem_type
    label_dtype: ClassVar[type] = int

    # -- data ----------------------------------------------------------------------------------

    @classmethod
    def claims_batch(cls, batch: dict) -> bool:
        return cls is ClassificationTask and batch["labels"].dim() == 1

    def encode(self, ds, tokenizer, *, text_columns, max_length: int):
        cols = list(text_columns)
        cast = self.label_dtype

        def fn(batch):
            a = [str(x) for x in batch[cols[0]]]
            b = [str(x) for x in batch[cols[1]]] if len(cols) == 2 else None
            enc = tokenizer(a, b, truncation=True, max_length=max_length, padding=False)
            out = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
            out["labels"] = [cast(x) for x in batch["label"]]
            if SOURCE_INDEX in batch:
                out[SOURCE_INDEX] = batch[SOURCE_INDEX]
            return out

        return ds.map(
            fn,
            batched=True,
            remove_columns=ds.column_names,
            keep_in_memory=True,
            load_from_cache_file=False,
        )

    def collator(self, tokenizer, pad_to_multiple_of: int | None = None):
        """``transformers.DataCollatorWithPadding``: pads ``input_ids`` with the tokenizer's pad
        id and the masks with 0 to the longest row (rounded up to ``pad_to_multiple_of``)."""
        from transformers import DataCollatorWithPadding

        pad = DataCollatorWithPadding(
            tokenizer, pad_to_multiple_of=pad_to_multiple_of, return_tensors="pt"
        )
        return lambda rows: dict(pad(rows))

    # -- models ----------------------------------------------------------------------------------
    def build_model(self, name_or_path: str, *, role: str, options: ModelOptions) -> nn.Module:
        """``AutoModelForSequenceClassification`` from a hub name, a local folder or
        ``embedded:<size>`` (a BERT built from a config, initialised from ``seed``)."""
        from transformers import AutoModelForSequenceClassification

        n, o = self.num_labels, options
        if hf.is_embedded(name_or_path):
            cfg = hf.embedded_bert_config(
                name_or_path.removeprefix(hf.EMBEDDED_PREFIX),
                vocab_size=o.vocab_size,
                num_labels=n,
                dropout=o.dropout,
            )
            cfg.problem_type = self.problem_type
            with hf.seeded(hf.init_seed(o.seed, role)):
                model = AutoModelForSequenceClassification.from_config(cfg)
        else:
            cfg = hf.load_config(name_or_path, role)
            archs = list(cfg.architectures or [])
            if archs and all(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
                raise ModelError(
                    f"model.{role} {name_or_path!r} is a causal LM ({archs[0]}) but the task "
                    f"is {self.name}: for decoder distillation set data.task_type=causal_lm"
                )
            trained = any(
                a.endswith("ForSequenceClassification") for a in (cfg.architectures or [])
            )
            if trained and cfg.num_labels != n:
                raise ModelError(
                    f"{role} {name_or_path!r} was trained with a {cfg.num_labels}-label "
                    f"classification head but the task has {n} labels"
                )
            cfg.num_labels = n
            if self.problem_type:
                cfg.problem_type = self.problem_type
            hf.set_dropout(cfg, o.dropout)
            try:
                with hf.seeded(hf.init_seed(o.seed, role)):  # a new head is initialised here
                    model = AutoModelForSequenceClassification.from_pretrained(
                        name_or_path, config=cfg
                    )
            except Exception as e:  # noqa: BLE001
                raise ModelError(f"model.{role}: cannot load {name_or_path!r}: {e}") from e
        if self.label_names and len(self.label_names) == n:  # saved with the model
            model.config.id2label = dict(enumerate(self.label_names))
            model.config.label2id = {name: i for i, name in enumerate(self.label_names)}
        if o.zero_init_head:
            _zero_classifier_(model)
        return model

    def check_pair(self, teacher: nn.Module, student: nn.Module, t_name: str, s_name: str):
        nt, ns = teacher.config.num_labels, student.config.num_labels
        if nt != ns:
            raise ModelError(
                f"teacher {t_name!r} predicts {nt} labels but student {s_name!r} "
                f"predicts {ns}: distillation needs the same label set"
            )

    # -- losses ----------------------------------------------------------------------------------
    def kd_per_row(self, logits, target_logits, temperature, beta=0.0, differentiable=False):
        """Per-row divergence of ``softmax(logits/T)`` from ``softmax(target/T)``; gradient to
        ``logits`` only. Shapes [N, C] -> [N]. ``beta`` (TRL / Liger convention): 0 = forward
        ``KL(p_target || p)``, 1 = reverse ``KL(p || p_target)``, in between the generalised JSD
        ``beta KL(p_target || m) + (1 - beta) KL(p || m)``, ``m = beta p_target + (1 - beta) p``.
        ``differentiable``: the same in plain torch ops (fp32 or float64), twice differentiable,
        with a gradient to ``target_logits`` too."""
        if differentiable:
            dtype = torch.promote_types(logits.dtype, torch.float32)
            return divergence_f64(logits.to(dtype), target_logits.to(dtype), temperature, beta)
        if logits.dtype == torch.float64:
            return divergence_f64(logits, target_logits.detach().double(), temperature, beta)
        if beta == 0.0:
            return lgtm_kernels.kd_loss(
                logits,
                target_logits.detach().to(logits.dtype),
                temperature=temperature,
                reduction="none",
            )
        return lgtm_kernels.kd_loss(
            logits,
            target_logits.detach().to(logits.dtype),
            temperature=temperature,
            divergence="jsd",
            beta=beta,
            reduction="none",
        )

    task_loss_closed_form = True  # the fused LGTM logit gradient's CE term is this loss

    def task_loss(self, logits, labels):
        """Cross-entropy summed over rows / number of rows; labels < 0 add nothing."""
        dtype = torch.promote_types(logits.dtype, torch.float32)
        ce = F.cross_entropy(logits.to(dtype), labels, ignore_index=-100, reduction="sum")
        return ce / max(labels.shape[0], 1)

    def lgtm_logit_grad(self, z, s, s_plus, s_minus, labels, p: InfluenceParams, n_rows=None):
        """dL/dz of the LGTM teacher objective, and the per-row distillation influence.

        ``dL/dz = a_t (softmax(z/T) - q) / (T n) + (1 - a_t)(softmax(z) - onehot(y)) / n
                  + eta a_t (q+ - q-) / (2 R T n)``
        with ``q`` (``q+``, ``q-``) the student probabilities at theta (theta +- R v). Feeding
        this into one teacher backward equals ``grad_phi L_t(theta) - eta * h`` of the reference
        form. Influence ``I_i = -eta (l_i(+) - l_i(-)) / (2R)``, ``l_i`` the student's per-row
        KD loss. One fused pass (``lgtm_kernels``). Returns (dL/dz in z's dtype [N, C],
        influence [N]).

        ``n_rows``: the normaliser ``n`` (default: the rows here; a chunk of rows passes the
        whole micro-batch's count).

        ``scale_by_t2`` multiplies both KD terms by T^2: the kernel's single ``alpha`` is
        rescaled to ``a' = a T^2 / s`` with ``s = a T^2 + 1 - a`` and its gradient multiplied by
        ``s`` (so the KD terms get ``a T^2``, the CE term ``1 - a``); the influence by ``T^2``.
        """
        if p.beta_teacher != 0.0 or p.beta_student != 0.0 or not self.task_loss_is_closed_form():
            # other divergences, or a subclass's own task_loss: autograd on the logits
            return super().lgtm_logit_grad(z, s, s_plus, s_minus, labels, p, n_rows)
        a, t2 = float(p.alpha_teacher), self.kd_scale(p.temperature, p.scale_by_t2)
        scale = a * t2 + (1 - a)
        grad, influence = lgtm_kernels.lgtm_teacher_logit_grad(
            z.detach(),
            s.detach(),
            s_plus.detach(),
            s_minus.detach(),
            labels,
            alpha_teacher=a * t2 / scale,
            temperature=p.temperature,
            eta=p.eta,
            radius=p.radius,
            n_rows=n_rows,
        )
        if scale != 1.0:
            grad = grad * scale
        if t2 != 1.0:
            influence = influence * t2
        return grad, influence

    def lgtm_teacher_pass(self, z, s, s_plus, s_minus, labels, p, *, split=False):
        """:meth:`Task.lgtm_teacher_pass` over the rows with one call of :meth:`lgtm_rows`
        (the reported loss through :meth:`distill_loss`: a subclass's ``task_loss`` counts)."""
        grad, term, influence, _ = self.lgtm_rows(
            z, s, s_plus, s_minus, labels, p, split=split, loss=False
        )
        return TeacherPass(grad, influence, self.teacher_loss_value(z, s, labels, p), term)

    @torch.no_grad()
    def lgtm_rows(
        self, z, s, s_plus, s_minus, labels, p: InfluenceParams, *, split, n_rows=None, loss=True
    ):
        """``(dL/dz, term, influence, teacher loss)`` per row, from one read of the four
        logits: what :meth:`lgtm_logit_grad` gives (``split``: dL/dz with ``eta = 0``, and
        ``term`` the :meth:`influence_logit_term`; else ``term`` None) and (``loss``; else None)
        the teacher's loss ``a k KD(s || z) + (1 - a) CE(z, y)`` per row (not yet divided by
        ``n``; 0 at ignored labels' CE). ``n_rows``: the gradients' normaliser ``n`` (default:
        the rows here; a chunk of rows passes the micro-batch's count)."""
        n = max(n_rows or z.shape[0], 1)
        rows = ClassificationTask.lgtm_logit_grad  # on rows (subclasses' take their own shapes)
        if not split:
            grad, influence = rows(self, z, s, s_plus, s_minus, labels, p, n_rows=n)
            term = None
        else:
            no_eta = dataclasses.replace(p, eta=0.0)
            grad, _ = rows(self, z, s, s_plus, s_minus, labels, no_eta, n_rows=n)
            term, influence = self._influence_rows(z, s_plus, s_minus, p, n)
        loss_rows = self._teacher_loss_rows(z, s, labels, p) if loss else None
        return grad, term, influence, loss_rows

    def _influence_rows(self, z, s_plus, s_minus, p: InfluenceParams, n: int):
        """(the influence part of dL/dz, the per-row influence), sharing the student's
        log-probabilities at theta +- R v (forward KL); other divergences compose."""
        dtype = torch.promote_types(z.dtype, torch.float32)
        T, k = float(p.temperature), self.kd_scale(p.temperature, p.scale_by_t2)
        if p.beta_teacher != 0.0 or p.beta_student != 0.0:
            term = ClassificationTask.influence_logit_term(self, s_plus, s_minus, p, z=z, n_rows=n)
            zt = z.detach().to(dtype)
            l_plus, l_minus = (
                self.kd_per_row(x.detach().to(dtype), zt, T, p.beta_student)
                for x in (s_plus, s_minus)
            )
            return term, -p.eta * k * (l_plus - l_minus) / (2 * p.radius)
        lq_plus = torch.log_softmax(s_plus.detach().to(dtype) / T, dim=-1)
        lq_minus = torch.log_softmax(s_minus.detach().to(dtype) / T, dim=-1)
        coef = p.eta * p.alpha_teacher * k / (2 * p.radius * T * n)
        term = coef * (lq_plus.exp() - lq_minus.exp())
        zt = z.detach().to(dtype)
        pt = torch.softmax(zt / T, dim=-1)
        diff = torch.where(zt == float("-inf"), 0.0, pt * (lq_minus - lq_plus)).sum(-1)
        return term, -p.eta * k * diff / (2 * p.radius)

    def _teacher_loss_rows(self, z, s, labels, p: InfluenceParams) -> torch.Tensor:
        """``a k KD_beta_t(s || z) + (1 - a) CE(z, y)`` per row (fp32; float64 stays)."""
        dtype = torch.promote_types(z.dtype, torch.float32)
        a = float(p.alpha_teacher)
        out = torch.zeros(z.shape[0], dtype=dtype, device=z.device)
        if a > 0:
            kd = self.kd_per_row(z.detach(), s, p.temperature, p.beta_teacher)
            out += (a * self.kd_scale(p.temperature, p.scale_by_t2)) * kd.to(dtype)
        if a < 1:
            ce = F.cross_entropy(z.detach().to(dtype), labels, ignore_index=-100, reduction="none")
            out += (1 - a) * ce
        return out

    def influence_logit_term(
        self, s_plus, s_minus, p: InfluenceParams, z=None, labels=None, n_rows=None
    ):
        """``eta a_t (q+ - q-) / (2 R T n)`` (times T^2 with ``scale_by_t2``), fp32; for other
        divergences ``-eta a_t k (g(s+) - g(s-)) / (2 R n)`` (see the autograd form above),
        which needs the teacher logits ``z``. ``n_rows``: ``n`` (default: the rows here)."""
        dtype = torch.promote_types(s_plus.dtype, torch.float32)
        T, n = float(p.temperature), n_rows or s_plus.shape[0]
        k = self.kd_scale(T, p.scale_by_t2)
        if p.beta_teacher != 0.0:
            return super().influence_logit_term(s_plus, s_minus, p, z=z, n_rows=n)
        q_plus = torch.softmax(s_plus.detach().to(dtype) / T, dim=-1)
        q_minus = torch.softmax(s_minus.detach().to(dtype) / T, dim=-1)
        coef = p.eta * p.alpha_teacher * k / (2 * p.radius * T * n)
        return coef * (q_plus - q_minus)


def divergence_f64(logits, target, temperature, beta):
    """Plain torch form of :meth:`ClassificationTask.kd_per_row` (float64: the test oracle;
    any dtype: the differentiable form)."""
    log_q = F.log_softmax(logits / temperature, dim=-1)
    log_p = F.log_softmax(target / temperature, dim=-1)
    if beta == 0.0:
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    if beta == 1.0:
        return (log_q.exp() * (log_q - log_p)).sum(-1)
    log_m = torch.logsumexp(
        torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), dim=0
    )
    kl_p = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_q = (log_q.exp() * (log_q - log_m)).sum(-1)
    return beta * kl_p + (1 - beta) * kl_q


@TASKS.register
class RegressionTask(ClassificationTask):
    name = "regression"
    labels = "values"
    summary = "one-output head, float labels: squared-error distillation and loss; Pearson"
    default_metrics = ("pearson", "spearman")
    problem_type = "regression"
    label_dtype = float

    def __init__(self, **kw):
        kw["num_labels"] = 1
        super().__init__(**kw)

    def kd_per_row(self, logits, target_logits, temperature, beta=0.0, differentiable=False):
        """``(logits - target)^2`` per row (no temperature, no ``beta``); ``differentiable``:
        the target is not detached."""
        dtype = torch.promote_types(logits.dtype, torch.float32)
        target = target_logits if differentiable else target_logits.detach()
        return (logits.to(dtype) - target.to(dtype)).pow(2).sum(-1)

    task_loss_closed_form = True  # the closed-form logit gradient below assumes this MSE

    def task_loss(self, logits, labels):
        dtype = torch.promote_types(logits.dtype, torch.float32)
        return (logits.to(dtype).squeeze(-1) - labels.to(dtype)).pow(2).mean()

    def kd_scale(self, temperature, scale_by_t2):
        return 1.0

    example_stat_name = "sq_err"

    @torch.no_grad()
    def example_stat(self, logits, labels):
        """Squared error of the prediction per example."""
        return (logits.float().reshape(-1) - labels.float().reshape(-1)).pow(2)

    def lgtm_logit_grad(self, z, s, s_plus, s_minus, labels, p: InfluenceParams):
        """``dL/dz = 2 a_t (z - s)/n + 2 (1 - a_t)(z - y)/n + eta a_t 2 (s+ - s-)/(2 R n)``,
        ``I_i = -eta ((s+_i - z_i)^2 - (s-_i - z_i)^2) / (2R)``. A subclass with its own
        ``task_loss``: the same with that loss's gradient, by autograd."""
        if not self.task_loss_is_closed_form():
            return Task.lgtm_logit_grad(self, z, s, s_plus, s_minus, labels, p)
        dtype = torch.promote_types(z.dtype, torch.float32)
        z, s, sp, sm = (x.detach().to(dtype) for x in (z, s, s_plus, s_minus))
        y = labels.to(dtype).reshape(z.shape)
        n, a, eta, radius = z.shape[0], float(p.alpha_teacher), p.eta, p.radius
        grad = 2 * a * (z - s) / n + 2 * (1 - a) * (z - y) / n + eta * a * (sp - sm) / (radius * n)
        influence = -eta * ((sp - z).pow(2) - (sm - z).pow(2)).sum(-1) / (2 * radius)
        return grad, influence

    lgtm_teacher_pass = Task.lgtm_teacher_pass  # the composition: outputs are one column

    def influence_logit_term(self, s_plus, s_minus, p: InfluenceParams, z=None, labels=None):
        """``eta a_t 2 (s+ - s-) / (2 R n)``, fp32."""
        dtype = torch.promote_types(s_plus.dtype, torch.float32)
        diff = s_plus.detach().to(dtype) - s_minus.detach().to(dtype)
        n = s_plus.shape[0]
        return (p.eta * p.alpha_teacher / (p.radius * n)) * diff


@torch.no_grad()
def _zero_classifier_(model: nn.Module) -> None:
    """The LGTM reference initialises both classification heads to zero: the final projection
    only (zeroing a hidden dense layer of the head too would kill its gradient)."""
    head = next(
        (
            getattr(model, a)
            for a in ("classifier", "score", "classification_head")
            if getattr(model, a, None) is not None
        ),
        None,
    )
    last = None
    for m in head.modules() if head is not None else ():
        if isinstance(m, nn.Linear):
            last = m
    if last is not None:
        last.weight.zero_()
        if last.bias is not None:
            last.bias.zero_()
