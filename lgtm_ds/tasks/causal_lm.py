"""Causal language models at token level (docs/algorithm.md, "Token level").

A *row* is a valid token position: the logits at position t predict ``labels[t + 1]`` (the
Hugging Face shift) and ``labels == -100`` (prompt, padding) are ignored. Every per-micro-batch
loss here is a mean over the micro-batch's valid tokens; the method rescales each micro-batch by
its share of the global valid-token count (``Task.count_rows``), so that losses are
``sum over tokens / n_global`` across micro-batches and ranks.
"""

from __future__ import annotations

import math
from typing import ClassVar

import lgtm_kernels
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..engines.head import HeadGrad, HeadOutput, full_shape, head_mode
from ..errors import ModelError
from . import hf
from .base import TASKS, InfluenceParams, ModelOptions, TeacherPass
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
    reads = "text"  # the formats of lm_data: text, prompt_completion, messages
    labels = None
    generates = True
    first_token_summarises = False  # a decoder's first token is its BOS
    lower_is_better: ClassVar[frozenset[str]] = frozenset({"ce", "perplexity"})
    fused_head = True  # takes HeadOutput (engines/head.py) for every loss and evaluation

    @classmethod
    def claims_batch(cls, batch: dict) -> bool:
        return cls is CausalLMTask and batch["labels"].dim() == 2

    def __init__(self, *, lm_format=None, head_chunk: int | None = None, **kw):
        super().__init__(**kw)
        self.lm_format = lm_format  # lm_data.LMFormat: which columns, which loss mask
        self.head_chunk = head_chunk  # token rows per chunk of the fused head (None: default)
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

    def prepare_tokenizer(self, tokenizer) -> None:
        """A tokenizer without a pad token pads with EOS (padded positions carry attention 0
        and label -100)."""
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

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
                name_or_path.removeprefix(hf.EMBEDDED_PREFIX),
                options=o,
                max_position=max(512, getattr(self, "max_length", 0) or 0),
            )
            with hf.seeded(hf.init_seed(o.seed, role)):
                return AutoModelForCausalLM.from_config(cfg)
        if hf.gguf_parts(name_or_path) is not None:  # dequantised into a plain model
            return hf.load_gguf_model(name_or_path, role, o.dropout)
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
        vt, vs = _out_rows(teacher), _out_rows(student)
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

    _SCALED_LOGITS = (  # config attributes of models whose logits are not lm_head(h)
        "final_logit_softcapping",
        "logit_scale",
        "logits_scaling",
        "output_multiplier_scale",
    )

    @torch.no_grad()
    def head_matches(self, module: nn.Module) -> str | None:
        """None if ``module``'s logits are ``get_output_embeddings()`` on ``get_decoder()``'s
        last hidden states: known logit transforms in the config (soft-capping, scaling) are
        refused by name, then the two are compared on an 8-token input in eval mode."""
        cfg = getattr(module, "config", None)
        for key in self._SCALED_LOGITS:
            value = getattr(cfg, key, None)
            if value not in (None, 0, 0.0, 1, 1.0, False):
                return f"its config sets {key}={value} (logits are not the output layer's)"
        try:
            head = module.get_output_embeddings()
            module.get_decoder()
        except (AttributeError, NotImplementedError) as e:
            return f"no decoder / output layer to split at ({e})"
        if not isinstance(head, nn.Linear):
            return f"its output layer is a {type(head).__name__}, not a Linear"
        # ZeRO-3: the module's hooks gather the parameters for both forwards
        ids = torch.arange(3, 11, device=head.weight.device).remainder(_out_rows(module))
        ids = ids.unsqueeze(0)
        was = module.training
        module.eval()
        try:
            full = module(input_ids=ids).logits.float()
            with head_mode(module):
                out = module(input_ids=ids)
            split = F.linear(out.hidden, out.weight, out.bias).float()
        finally:
            module.train(was)
        err = float((full - split).abs().max())
        if err > 1e-3 * float(full.abs().max()) + 1e-6:
            return f"its logits differ from the output layer on its hidden states by {err:.3g}"
        return None

    # -- rows --------------------------------------------------------------------------------------
    def rows(self, logits, labels: torch.Tensor):
        """``(logits [N, V], targets [N], mask [B, L-1])`` of the valid token positions:
        position t predicts ``labels[t+1]``; the vocabulary is cut to the shared size. For a
        :class:`HeadOutput` the first item is a :class:`HeadRows` (hidden-state rows)."""
        mask = labels[:, 1:] != IGNORE
        return self._target_rows(logits, mask), labels[:, 1:][mask], mask

    def _target_rows(self, target, mask: torch.Tensor):
        V = self.vocab_size or target.shape[-1]
        if isinstance(target, HeadOutput):
            return HeadRows(target.hidden[:, :-1][mask], target.weight, target.bias, V)
        return target[:, :-1, :V][mask]

    def _chunk(self, n: int, r) -> int:
        """Token rows per chunk (``model.fused_head_chunk``, else lgtm_kernels' default)."""
        if self.head_chunk:
            return self.head_chunk
        V = r.V if _is_head(r) else r.shape[-1]
        return lgtm_kernels.default_chunk_size(n, 1, V)

    @staticmethod
    def _full(x):
        """Full logits of a HeadOutput (paths without a chunked form); logits unchanged."""
        return x.full_logits() if isinstance(x, HeadOutput) else x

    def _scatter(self, like: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``[B, L, V_model]`` zeros with ``rows`` at the valid positions (the logit gradient)."""
        full = like.new_zeros(like.shape, dtype=rows.dtype)
        full[:, :-1, : rows.shape[-1]][mask] = rows
        return full

    # -- losses ----------------------------------------------------------------------------------
    def distill_loss(
        self,
        logits,
        target_logits,
        labels,
        *,
        alpha,
        temperature,
        scale_by_t2=False,
        beta=0.0,
        differentiable=False,
    ):
        """Mean over the micro-batch's valid tokens of ``alpha k KD + (1 - alpha) CE``. With a
        :class:`HeadOutput` learner, chunk by chunk through its output layer
        (``lgtm_kernels.fused_linear_loss``; ``differentiable``: full logits)."""
        kw = dict(scale_by_t2=scale_by_t2, beta=beta, differentiable=differentiable)
        if differentiable or not isinstance(logits, HeadOutput):
            logits, target_logits = self._full(logits), self._full(target_logits)
            rows, y, mask = self.rows(logits, labels)
            target = self._target_rows(target_logits, mask)
            return super().distill_loss(rows, target, y, alpha=alpha, temperature=temperature, **kw)
        r, y, mask = self.rows(logits, labels)
        t = self._target_rows(target_logits.detach(), mask)
        k = self.kd_scale(temperature, scale_by_t2)

        def row_loss(z, lo, hi):
            dtype = torch.promote_types(z.dtype, torch.float32)
            loss = z.new_zeros((), dtype=dtype)
            if alpha > 0:
                kd = self.kd_per_row(z, _rows(t, lo, hi), temperature, beta)
                loss = loss + alpha * k * kd.sum()
            if alpha < 1:
                ce = F.cross_entropy(z.to(dtype), y[lo:hi], ignore_index=IGNORE, reduction="sum")
                loss = loss + (1 - alpha) * ce
            return loss

        n = y.shape[0]
        return lgtm_kernels.fused_linear_loss(
            r.hidden,
            r.weight,
            r.bias,
            row_loss,
            scale=1.0 / max(n, 1),
            vocab_size=r.V,
            chunk_size=self._chunk(n, r),
        )

    def kd_per_example(self, logits, target_logits, labels, temperature, beta=0.0):
        """KD loss summed over each sequence's valid tokens [B]."""
        logits, target_logits = self._full(logits), self._full(target_logits)
        rows, _, mask = self.rows(logits, labels)
        per_row = self.kd_per_row(rows, self._target_rows(target_logits, mask), temperature, beta)
        out = torch.zeros(logits.shape[0], dtype=per_row.dtype, device=per_row.device)
        return out.index_add_(0, mask.nonzero()[:, 0], per_row)

    task_loss_closed_form = True  # the chunked LGTM logit gradient's CE term is this loss

    def task_loss(self, logits, labels):
        """Next-token CE, mean over the valid tokens."""
        if not isinstance(logits, HeadOutput) and logits.dim() == 2:  # already rows
            return super().task_loss(logits, labels)
        rows, y, _ = self.rows(logits, labels)
        if _is_head(rows):
            return lgtm_kernels.fused_linear_cross_entropy(
                rows.hidden,
                rows.weight,
                y,
                rows.bias,
                normalizer=y.shape[0],
                vocab_size=rows.V,
                chunk_size=self._chunk(y.shape[0], rows),
            )
        return super().task_loss(rows, y)

    def _row_ce(self, r, y) -> torch.Tensor:
        """Per-row CE [N] (fp32), chunk by chunk, no graph."""
        out = []
        with torch.no_grad():
            step = self._chunk(y.shape[0], r)
            for lo in range(0, y.shape[0], step):
                z = _rows(r, lo, lo + step)
                out.append(F.cross_entropy(z.float(), y[lo : lo + step], reduction="none"))
        return torch.cat(out) if out else torch.zeros(0, device=y.device)

    example_stat_name = "ce"

    @torch.no_grad()
    def example_stat(self, logits, labels):
        """Mean next-token CE (nats) over each sequence's valid tokens [B]."""
        rows, y, mask = self.rows(logits, labels)
        ce = self._row_ce(rows, y)
        out = torch.zeros(labels.shape[0], dtype=torch.float32, device=ce.device)
        out.index_add_(0, mask.nonzero()[:, 0], ce)
        return out / mask.sum(1).clamp(min=1)

    def lgtm_logit_grad(self, z, s, s_plus, s_minus, labels, p: InfluenceParams):
        """The softmax classifier's logit gradient on the token rows (divided by this
        micro-batch's valid tokens), scattered to ``[B, L, V]``; the influence per *sequence*,
        the sum of its tokens' influence (docs/algorithm.md, token level)."""
        self._require_closed_form()
        rz, y, mask = self.rows(z, labels)
        rs, rp, rm = (self._target_rows(t, mask) for t in (s, s_plus, s_minus))
        seq = mask.nonzero()[:, 0]
        if _is_head(rz):  # through the teacher's output layer, chunk by chunk
            n = y.shape[0]
            parent = super()

            def logit_grad(zc, lo, hi):
                sides = (_rows(r, lo, hi) for r in (rs, rp, rm))
                return parent.lgtm_logit_grad(zc, *sides, y[lo:hi], p, n_rows=n)

            gh, gw, gb, infl_rows = lgtm_kernels.fused_linear_logit_grad(
                rz.hidden, rz.weight, rz.bias, logit_grad, vocab_size=rz.V,
                chunk_size=self._chunk(n, rz),
            )  # fmt: skip
            grad = self._head_grad(z, mask, gh, gw, gb)
            if infl_rows is None:  # no valid token in this micro-batch
                infl_rows = torch.zeros(0, dtype=torch.float32, device=seq.device)
        else:
            rs, rp, rm = (_full_rows(r) for r in (rs, rp, rm))
            grad_rows, infl_rows = super().lgtm_logit_grad(rz, rs, rp, rm, y, p)
            grad = self._scatter(z, mask, grad_rows)
        per_seq = torch.zeros(labels.shape[0], dtype=infl_rows.dtype, device=infl_rows.device)
        per_seq.index_add_(0, seq, infl_rows)
        return grad, per_seq

    def lgtm_teacher_pass(self, z, s, s_plus, s_minus, labels, p, *, split=False):
        """:meth:`Task.lgtm_teacher_pass` on the token rows in ONE pass: with a
        :class:`HeadOutput` teacher, one chunked pass through the teacher's output layer that
        forms each chunk's four logits once and takes from them dL/dz (and, ``split``, the
        influence term as a second gradient through the layer), the influence and the
        teacher's loss (was: a pass per quantity, each recomputing the four logit chunks).
        The loss is the mean over this micro-batch's valid tokens, the influence per sequence."""
        self._require_closed_form()
        rz, y, mask = self.rows(z, labels)
        rs, rp, rm = (self._target_rows(t, mask) for t in (s, s_plus, s_minus))
        n = y.shape[0]
        parent = super()
        if _is_head(rz):

            def chunk(zc, lo, hi):
                sides = (_rows(r, lo, hi) for r in (rs, rp, rm))
                g, term, infl, loss = parent.lgtm_rows(
                    zc, *sides, y[lo:hi], p, split=split, n_rows=n
                )
                return ((g, term) if split else g), (infl, loss)

            gh, gw, gb, rows = lgtm_kernels.fused_linear_logit_grad(
                rz.hidden, rz.weight, rz.bias, chunk, vocab_size=rz.V,
                chunk_size=self._chunk(n, rz),
            )  # fmt: skip
            if n == 0:  # no valid token: zero gradients of the single-gradient form
                gh, gw, gb = ((x, x) for x in (gh, gw, gb)) if split else (gh, gw, gb)
                dtype = torch.promote_types(rz.hidden.dtype, torch.float32)
                rows = (torch.zeros(0, dtype=dtype, device=y.device),) * 2
            infl_rows, loss_rows = rows
            if split:
                grad = self._head_grad(z, mask, gh[0], gw[0], gb[0])
                term = self._head_grad(z, mask, gh[1], gw[1], gb[1])
            else:
                grad, term = self._head_grad(z, mask, gh, gw, gb), None
        else:
            rs, rp, rm = (_full_rows(r) for r in (rs, rp, rm))
            g, term, infl_rows, loss_rows = parent.lgtm_rows(rz, rs, rp, rm, y, p, split=split)
            grad = self._scatter(z, mask, g)
            term = self._scatter(z, mask, term) if split else None
        per_seq = torch.zeros(labels.shape[0], dtype=infl_rows.dtype, device=infl_rows.device)
        per_seq.index_add_(0, mask.nonzero()[:, 0], infl_rows)
        return TeacherPass(grad, per_seq, loss_rows.sum() / max(n, 1), term)

    def meta_logit_grad(self, z, s, u, labels, *, coef, alpha, temperature, scale_by_t2=False,
                        beta=0.0):  # fmt: skip
        """:meth:`Task.meta_logit_grad`; with :class:`HeadOutput` s (the fused head: ``u`` the
        tangent of the student's, its logits' tangent ``u.hidden W^T + hidden u.weight^T +
        u.bias``) chunk by chunk of token rows through the teacher's output layer: a
        :class:`HeadGrad`, no full logits. Only the KD term depends on ``z`` (the CE's mixed
        derivative is 0): per row ``coef a k / n d/dz < d KD(s || z) / ds, u >``."""
        if not isinstance(z, HeadOutput):
            z, s, u = (self._full(x) for x in (z, s, u))
            return super().meta_logit_grad(
                z, s, u, labels, coef=coef, alpha=alpha, temperature=temperature,
                scale_by_t2=scale_by_t2, beta=beta,
            )  # fmt: skip
        rz, y, mask = self.rows(z, labels)
        rs = self._target_rows(s, mask)
        u_h = self._target_rows(HeadOutput(u.hidden, s.weight, u.bias), mask)  # h' W^T + b'
        u_w = self._target_rows(HeadOutput(s.hidden, u.weight), mask)  # h W'^T
        n = y.shape[0]
        c = coef * alpha * self.kd_scale(temperature, scale_by_t2) / max(n, 1)

        def logit_grad(zc, lo, hi):
            dtype = torch.promote_types(zc.dtype, torch.float32)
            z_ = zc.detach().to(dtype).requires_grad_()
            s_ = _rows(rs, lo, hi).detach().to(dtype).requires_grad_()
            uc = (_rows(u_h, lo, hi) + _rows(u_w, lo, hi)).to(dtype)
            with torch.enable_grad():
                kd = self.kd_per_row(s_, z_, temperature, beta, differentiable=True).sum()
                (gs,) = torch.autograd.grad(kd, s_, create_graph=True)
                (dz,) = torch.autograd.grad((gs * uc).sum(), z_)
            dz = c * dz
            return dz, dz.double().pow(2).sum(-1)

        gh, gw, gb, sq = lgtm_kernels.fused_linear_logit_grad(
            rz.hidden, rz.weight, rz.bias, logit_grad, vocab_size=rz.V,
            chunk_size=self._chunk(n, rz),
        )  # fmt: skip
        return self._head_grad(z, mask, gh, gw, gb), float(sq.sum()) if sq is not None else 0.0

    def check_for_lgtm(self) -> None:
        self._require_closed_form()

    def _require_closed_form(self) -> None:
        """LGTM's token-level teacher gradient has the next-token CE in closed form (chunked,
        no full logits); a subclass's own ``task_loss`` would be silently ignored there."""
        if not self.task_loss_is_closed_form():
            raise NotImplementedError(
                f"{type(self).__name__} overrides task_loss: LGTM's teacher logit gradient on "
                "decoders takes the next-token CE in closed form; override lgtm_logit_grad and "
                "lgtm_teacher_pass too, or set task_loss_closed_form = True in the class if "
                "task_loss is still that CE"
            )

    def influence_logit_term(self, s_plus, s_minus, p: InfluenceParams, z=None, labels=None):
        """The classifier's influence term on the token rows, scattered to ``[B, L, V]``; with a
        :class:`HeadOutput` teacher ``z``, taken through its output layer (a :class:`HeadGrad`)."""
        mask = labels[:, 1:] != IGNORE
        rp, rm = (self._target_rows(t, mask) for t in (s_plus, s_minus))
        rz = self._target_rows(z, mask) if z is not None else None
        if _is_head(rz):
            n = int(mask.sum())
            parent = super()

            def logit_grad(zc, lo, hi):
                sp, sm = _rows(rp, lo, hi), _rows(rm, lo, hi)
                return parent.influence_logit_term(sp, sm, p, z=zc, n_rows=n), None

            gh, gw, gb, _ = lgtm_kernels.fused_linear_logit_grad(
                rz.hidden, rz.weight, rz.bias, logit_grad, vocab_size=rz.V,
                chunk_size=self._chunk(n, rz),
            )  # fmt: skip
            return self._head_grad(z, mask, gh, gw, gb)
        rp, rm = _full_rows(rp), _full_rows(rm)
        rz = _full_rows(rz) if rz is not None else None
        like = self._full(z) if z is not None else self._full(s_plus)
        return self._scatter(like, mask, super().influence_logit_term(rp, rm, p, z=rz))

    @staticmethod
    def _head_grad(z: HeadOutput, mask, gh, gw, gb) -> HeadGrad:
        """The hidden-row gradient scattered to ``[B, L, H]`` (zero at ignored positions)."""
        full = z.hidden.new_zeros(z.hidden.shape, dtype=gh.dtype)
        full[:, :-1][mask] = gh
        return HeadGrad(full, gw, gb)

    # -- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def eval_rows(self, logits: dict[str, torch.Tensor], batch: dict) -> dict[str, np.ndarray]:
        """Per sequence: ``[CE summed over its valid tokens, valid tokens]`` of each model,
        ``[tokens where both models' top-1 agree, valid tokens]`` and ``[KL(p_t || p_s) summed
        over its valid tokens, valid tokens]``."""
        labels = batch["labels"]
        mask = labels[:, 1:] != IGNORE
        n_tok = mask.sum(1).double()
        out, top1, by_role = {}, {}, {}
        for role, z in logits.items():
            rows, y, _ = self.rows(z, labels)
            by_role[role] = rows
            step = self._chunk(y.shape[0], rows)
            ce, arg = [], []
            for lo in range(0, y.shape[0], step):  # chunks of rows: no full [N, V] in fp32
                zc = _rows(rows, lo, lo + step)
                ce.append(F.cross_entropy(zc.float(), y[lo : lo + step], reduction="none"))
                arg.append(zc.argmax(-1))
            ce = torch.cat(ce).double() if ce else torch.zeros(0, dtype=torch.float64)
            per_seq = torch.zeros(labels.shape[0], dtype=torch.float64, device=ce.device)
            per_seq.index_add_(0, mask.nonzero()[:, 0], ce)
            out[role] = torch.stack([per_seq, n_tok], 1).cpu().numpy()
            top1[role] = torch.cat(arg) if arg else torch.zeros(0, dtype=torch.long)
        if len(top1) == 2:
            agree = (top1["teacher"] == top1["student"]).double()
            per_seq = torch.zeros(labels.shape[0], dtype=torch.float64, device=agree.device)
            per_seq.index_add_(0, mask.nonzero()[:, 0], agree)
            out["agreement"] = torch.stack([per_seq, n_tok], 1).cpu().numpy()
            kl = self._eval_kl(by_role["teacher"], by_role["student"], int(mask.sum()), mask)
            per_seq = torch.zeros(labels.shape[0], dtype=torch.float64, device=kl.device)
            per_seq.index_add_(0, mask.nonzero()[:, 0], kl)
            out["kl"] = torch.stack([per_seq, n_tok], 1).cpu().numpy()
        return out

    def _eval_kl(self, rt, rs, n: int, mask: torch.Tensor) -> torch.Tensor:
        """``KL(p_t || p_s)`` at temperature 1 of each valid token row ``[N]`` (float64), in
        chunks of rows computed in fp32: no full ``[N, V]`` log-probabilities."""
        step = min(self._chunk(n, rt), self._chunk(n, rs))
        kl = []
        for lo in range(0, n, step):
            lt = F.log_softmax(_rows(rt, lo, lo + step).float(), -1)
            ls = F.log_softmax(_rows(rs, lo, lo + step).float(), -1)
            kl.append(F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1).double())
        return torch.cat(kl) if kl else torch.zeros(0, dtype=torch.float64, device=mask.device)

    def score(self, rows: dict[str, np.ndarray], labels) -> dict[str, float]:
        """Token-weighted CE (nats) and perplexity ``exp(CE)`` of each model on the whole eval
        split; ``agreement/top1`` = share of valid tokens where both models' argmax agree;
        ``agreement/kl`` = the teacher-student ``KL(p_t || p_s)`` in nats per valid token (0 only
        when the distributions match: two models that emit one token alike score a top-1
        agreement of 1 whatever the rest of their distributions)."""
        res = {}
        for key, a in rows.items():
            total, n = float(a[:, 0].sum()), float(a[:, 1].sum())
            if key in ("agreement", "kl"):
                name = "agreement/top1" if key == "agreement" else "agreement/kl"
                res[name] = total / max(n, 1.0)
                continue
            ce = total / max(n, 1.0)
            res[f"{key}/ce"] = ce
            res[f"{key}/perplexity"] = math.exp(min(ce, 700.0))
        return res

    @property
    def primary_metric(self) -> str:
        return "perplexity"


class HeadRows:
    """The valid token rows of a :class:`HeadOutput`: hidden states ``[N, H]`` and the output
    layer cut to the shared vocabulary ``V``; logits of rows ``lo:hi`` on demand."""

    def __init__(self, hidden, weight, bias, V: int):
        self.hidden, self.weight, self.bias, self.V = hidden, weight, bias, V

    def logits(self, lo: int, hi: int) -> torch.Tensor:
        b = self.bias[: self.V] if self.bias is not None else None
        return F.linear(self.hidden[lo:hi], self.weight[: self.V], b)

    def full(self) -> torch.Tensor:
        return self.logits(0, self.hidden.shape[0])


def _is_head(r) -> bool:
    return isinstance(r, HeadRows)


def _rows(r, lo: int, hi: int) -> torch.Tensor:
    """Logits of rows ``lo:hi`` of a row tensor or a :class:`HeadRows`."""
    return r.logits(lo, hi) if isinstance(r, HeadRows) else r[lo:hi]


def _full_rows(r):
    return r.full() if isinstance(r, HeadRows) else r


def _out_rows(model: nn.Module) -> int:
    """The output layer's row count (its full shape also when ZeRO-3 has partitioned it)."""
    return int(full_shape(model.get_output_embeddings().weight)[0])
