"""Causal language models at token level (lgtm-method.md, "Token level (causal LMs)").

A *row* is a valid token position: the logits at position t predict ``labels[t + 1]`` (the
Hugging Face shift) and ``labels == -100`` (prompt, padding) are ignored. Every per-micro-batch
loss here is a mean over the micro-batch's valid tokens; the method rescales each micro-batch by
its share of the global valid-token count (``Task.count_rows``), so that losses are
``sum over tokens / n_global`` across micro-batches and ranks.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from . import hf
from .base import TASKS, InfluenceParams, ModelOptions
from .classification import ClassificationTask
from .lm_data import CausalLMCollator, encode_lm

IGNORE = -100


@TASKS.register
class CausalLMTask(ClassificationTask):
    """Token-level distillation of decoders. The per-row losses, the LGTM logit gradient and the
    influence are the softmax classifier's (:class:`ClassificationTask`) applied to the valid
    token rows ``[N, V]``; this class selects the rows and scatters the logit gradient back to
    ``[B, L, V]`` (zero at ignored positions). The seam the memory work replaces: every loss
    goes through :meth:`rows`, so full logits are only ever read here."""

    name = "causal_lm"
    summary = "decoder LM: token-level KL/JSD distillation + next-token CE; CE, perplexity, top-1"
    default_metrics = ("ce", "perplexity")
    embedded_tokenizer = "decoder"
    lower_is_better: ClassVar[frozenset[str]] = frozenset({"ce", "perplexity"})

    def __init__(self, *, lm_format=None, **kw):
        super().__init__(**kw)
        self.lm_format = lm_format  # lm_data.LMFormat: which columns, which loss mask
        self.last_encode_dropped = 0
        self.tokenizer_size: int | None = None  # set by build_model (the tokenizer's length)
        self.vocab_size: int | None = None  # the shared output size, set by check_pair

    # -- data ----------------------------------------------------------------------------------
    def encode(self, ds, tokenizer, *, text_columns, max_length: int):
        """Tokenize ``ds`` in this task's format (``lm_format``) into ``input_ids``,
        ``attention_mask`` and ``labels`` (-100 where no loss); rows whose loss tokens are all
        truncated away are dropped (``last_encode_dropped`` counts them)."""
        self.max_length = max_length
        enc, dropped = encode_lm(ds, tokenizer, self.lm_format, max_length=max_length)
        self.last_encode_dropped = dropped
        return enc

    def collator(self, tokenizer, pad_to_multiple_of: int | None = None):
        return CausalLMCollator(tokenizer, pad_to_multiple_of=pad_to_multiple_of)

    def count_rows(self, batch: dict) -> int:
        """Valid (shifted) label positions of a batch."""
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    # -- models ----------------------------------------------------------------------------------
    def build_model(self, name_or_path: str, *, role: str, options: ModelOptions) -> nn.Module:
        """``AutoModelForCausalLM`` from a hub name, a local folder or ``embedded:<size>`` (a
        small Llama-shaped or GPT-2 decoder built from a config, ``hf.EMBEDDED_DECODERS``)."""
        from transformers import AutoModelForCausalLM

        o = options
        self.tokenizer_size = o.vocab_size
        if hf.is_embedded(name_or_path):
            cfg = hf.embedded_decoder_config(
                name_or_path.removeprefix(hf.EMBEDDED_PREFIX), options=o
            )
            with hf.seeded(hf.init_seed(o.seed, role)):
                return AutoModelForCausalLM.from_config(cfg)
        cfg = hf.load_config(name_or_path, role)
        archs = list(cfg.architectures or [])
        if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
            raise ModelError(
                f"model.{role} {name_or_path!r} is a {archs[0]}, not a causal LM: data.task_type "
                f"causal_lm distills decoders (AutoModelForCausalLM); for a sequence classifier "
                f"leave data.task_type unset"
            )
        hf.set_dropout(cfg, o.dropout)
        try:
            return AutoModelForCausalLM.from_pretrained(name_or_path, config=cfg)
        except Exception as e:  # noqa: BLE001
            raise ModelError(f"model.{role}: cannot load {name_or_path!r}: {e}") from e

    def check_pair(self, teacher, student, t_name, s_name):
        """Output rows of both models vs the tokenizer. Equal rows: fine. Different rows that
        both cover the tokenizer (an output layer padded past it, e.g. 152064 vs 151936): the
        logits are cut to the smaller size, the shared vocabulary. Anything else: ModelError."""
        vt = teacher.get_output_embeddings().weight.shape[0]
        vs = student.get_output_embeddings().weight.shape[0]
        n_tok = self.tokenizer_size or min(vt, vs)
        shared = min(vt, vs)
        if shared < n_tok:
            raise ModelError(
                f"vocabulary mismatch: teacher {t_name!r} has {vt} output rows, student "
                f"{s_name!r} has {vs}, the tokenizer has {n_tok} tokens: both models must cover "
                f"the tokenizer (output rows >= {n_tok})"
            )
        self.vocab_size = shared
        for role, model, name in (("teacher", teacher, t_name), ("student", student, s_name)):
            n_pos = getattr(model.config, "n_positions", None)  # learned positions (GPT-2 family)
            if n_pos is not None and getattr(self, "max_length", 0) > n_pos:
                raise ModelError(
                    f"{role} {name!r} has {n_pos} learned positions but data.max_length is "
                    f"{self.max_length}: lower data.max_length to <= {n_pos}"
                )

    # -- rows --------------------------------------------------------------------------------------
    def rows(self, logits: torch.Tensor, labels: torch.Tensor):
        """``(logits [N, V], targets [N], mask [B, L-1])`` of the valid token positions:
        position t predicts ``labels[t+1]``; the vocabulary is cut to the shared size."""
        mask = labels[:, 1:] != IGNORE
        V = self.vocab_size or logits.shape[-1]
        return logits[:, :-1, :V][mask], labels[:, 1:][mask], mask

    def _target_rows(self, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        V = self.vocab_size or target.shape[-1]
        return target[:, :-1, :V][mask]

    def _scatter(self, like: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``[B, L, V_model]`` zeros with ``rows`` at the valid positions (the logit gradient)."""
        full = like.new_zeros(like.shape, dtype=rows.dtype)
        full[:, :-1, : rows.shape[-1]][mask] = rows
        return full

    # -- losses ----------------------------------------------------------------------------------
    def distill_loss(self, logits, target_logits, labels, *, alpha, temperature, **kw):
        """Mean over the micro-batch's valid tokens of ``alpha k KD + (1 - alpha) CE``."""
        rows, y, mask = self.rows(logits, labels)
        target = self._target_rows(target_logits, mask)
        return super().distill_loss(rows, target, y, alpha=alpha, temperature=temperature, **kw)

    def kd_per_example(self, logits, target_logits, labels, temperature, beta=0.0):
        """KD loss summed over each sequence's valid tokens [B]."""
        rows, _, mask = self.rows(logits, labels)
        per_row = self.kd_per_row(rows, self._target_rows(target_logits, mask), temperature, beta)
        out = torch.zeros(logits.shape[0], dtype=per_row.dtype, device=per_row.device)
        return out.index_add_(0, mask.nonzero()[:, 0], per_row)

    def task_loss(self, logits, labels):
        """Next-token CE, mean over the valid tokens."""
        if logits.dim() == 2:  # already rows
            return super().task_loss(logits, labels)
        rows, y, _ = self.rows(logits, labels)
        return super().task_loss(rows, y)

    example_stat_name = "ce"

    @torch.no_grad()
    def example_stat(self, logits, labels):
        """Mean next-token CE (nats) over each sequence's valid tokens [B]."""
        rows, y, mask = self.rows(logits, labels)
        ce = F.cross_entropy(rows.float(), y, reduction="none")
        out = torch.zeros(labels.shape[0], dtype=torch.float32, device=ce.device)
        out.index_add_(0, mask.nonzero()[:, 0], ce)
        return out / mask.sum(1).clamp(min=1)

    def lgtm_logit_grad(self, z, s, s_plus, s_minus, labels, p: InfluenceParams):
        """The softmax classifier's logit gradient on the token rows (divided by this
        micro-batch's valid tokens), scattered to ``[B, L, V]``; the influence per *sequence*,
        the sum of its tokens' influence (lgtm-method.md, token level)."""
        rz, y, mask = self.rows(z, labels)
        rs, rp, rm = (self._target_rows(t, mask) for t in (s, s_plus, s_minus))
        grad_rows, infl_rows = super().lgtm_logit_grad(rz, rs, rp, rm, y, p)
        seq = mask.nonzero()[:, 0]
        per_seq = torch.zeros(z.shape[0], dtype=infl_rows.dtype, device=infl_rows.device)
        per_seq.index_add_(0, seq, infl_rows)
        return self._scatter(z, mask, grad_rows), per_seq

    def influence_logit_term(self, s_plus, s_minus, p: InfluenceParams, z=None, labels=None):
        """The classifier's influence term on the token rows, scattered to ``[B, L, V]``."""
        _, _, mask = self.rows(s_plus, labels)
        rp, rm = (self._target_rows(t, mask) for t in (s_plus, s_minus))
        rz = self._target_rows(z, mask) if z is not None else None
        return self._scatter(s_plus, mask, super().influence_logit_term(rp, rm, p, z=rz))

    # -- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def eval_rows(self, logits: dict[str, torch.Tensor], batch: dict) -> dict[str, np.ndarray]:
        """Per sequence: ``[CE summed over its valid tokens, valid tokens]`` of each model and
        ``[tokens where both models' top-1 agree, valid tokens]``."""
        labels = batch["labels"]
        mask = labels[:, 1:] != IGNORE
        n_tok = mask.sum(1).double()
        out, top1 = {}, {}
        for role, z in logits.items():
            rows, y, _ = self.rows(z, labels)
            ce = F.cross_entropy(rows.float(), y, reduction="none").double()
            per_seq = torch.zeros(labels.shape[0], dtype=torch.float64, device=ce.device)
            per_seq.index_add_(0, mask.nonzero()[:, 0], ce)
            out[role] = torch.stack([per_seq, n_tok], 1).cpu().numpy()
            top1[role] = rows.argmax(-1)
        if len(top1) == 2:
            agree = (top1["teacher"] == top1["student"]).double()
            per_seq = torch.zeros(labels.shape[0], dtype=torch.float64, device=agree.device)
            per_seq.index_add_(0, mask.nonzero()[:, 0], agree)
            out["agreement"] = torch.stack([per_seq, n_tok], 1).cpu().numpy()
        return out

    def score(self, rows: dict[str, np.ndarray], labels) -> dict[str, float]:
        """Token-weighted CE (nats) and perplexity ``exp(CE)`` of each model on the whole eval
        split; ``agreement/top1`` = share of valid tokens where both models' argmax agree."""
        res = {}
        for key, a in rows.items():
            total, n = float(a[:, 0].sum()), float(a[:, 1].sum())
            if key == "agreement":
                res["agreement/top1"] = total / max(n, 1.0)
                continue
            ce = total / max(n, 1.0)
            res[f"{key}/ce"] = ce
            res[f"{key}/perplexity"] = math.exp(min(ce, 700.0))
        return res

    @property
    def primary_metric(self) -> str:
        return "perplexity"
