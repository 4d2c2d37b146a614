"""On-policy distillation for decoders (GKD, Agarwal et al. 2024; TRL's ``lmbda``): the keys,
and the component that turns a step's data-set micro-batches into sampled ones.

Per training step (one global batch), with probability ``method.lmbda`` the completions are
sampled from the current student; otherwise, with ``method.seq_kd``, from the teacher; otherwise
the data set's completions are used (``method.lmbda_start_step`` / ``lmbda_warmup_steps``:
an off-policy phase first, then the share rising to ``lmbda``). The draw is counter-based
(``(train seed, step)``), so it is the same on every rank, on any number of ranks, and after a
resume. The methods then run their ordinary step on the sampled micro-batches
(docs/on-policy.md):

- the student's loss on sampled sequences is the KD term alone over the generated tokens (its
  CE term is 0 on such a step, as in TRL's GKD: the sampled tokens are no gold labels);
- the teacher's KD term (and LGTM's influence on it) runs over the same sampled sequences,
  weighted ``a_t``; its supervised term stays: ``(1 - a_t)`` CE on the data set's completions
  of the same prompts (:class:`GoldAnchor`; MetaDistil: ``teacher_ce_weight`` CE), one more
  teacher forward per micro-batch, backpropagated with the KD term in one backward;
- the quiz (LGTM, MetaDistil) is the held-out data set, teacher-forced, as off-policy;
- the loss normaliser counts the generated tokens of the global batch (``Method.row_weights``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from pydantic import Field, model_validator

from ..errors import ConfigError
from ..options import Options
from ..tasks.rollout import (
    GENERATORS,
    GenerationSettings,
    Generator,
    batch_prompts,
    check_generation_tokens,
    onpolicy_batch,
)

if TYPE_CHECKING:
    from ..engines.base import Engine
    from ..tasks.base import Task
    from .distiller import Distiller

# numpy SeedSequence tags, so that the draw and the sampling streams never coincide
_DRAW, _SAMPLE = 0x0D1, 0x5A3


class GenerationOptions(Options):
    """on-policy sampling (method.lmbda > 0 or method.seq_kd): the backend and its settings."""

    backend: str = Field(
        "hf",
        description="generation backend: hf = Hugging Face generate on the training engine's "
        "module (KV cache, eval mode); docs/on-policy.md says how another plugs in",
        json_schema_extra={"choices": "lgtm_ds.methods.onpolicy:backend_names"},
    )
    temperature: float = Field(1.0, ge=0, description="sampling temperature; 0 = greedy (argmax)")
    top_p: float = Field(
        1.0,
        gt=0,
        le=1,
        description="nucleus sampling: keep the smallest set of tokens with "
        "this much probability (1 = all); no top-k",
    )
    max_new_tokens: int = Field(
        32,
        ge=1,
        description="new tokens per prompt at most; the longest training prompt plus this must "
        "fit in data.max_length",
    )
    zero3_gather: bool = Field(
        True,
        description="ZeRO-3: gather the generating model's parameters once per generation call "
        "(the full model on every rank meanwhile; forwards local) instead of once per forward "
        "(a collective per token, ranks kept in step with synced_gpus); false for a model whose "
        "full parameters do not fit on one device beside training's memory",
    )
    sample_every: int = Field(
        0,
        ge=0,
        description="keep a sample of what was generated (rank 0's first micro-batch) in "
        "generations/train_step<N>.jsonl at the first on-policy step of every this many steps; "
        "0 = never",
    )

    @model_validator(mode="after")
    def _known_backend(self) -> GenerationOptions:
        if self.backend not in GENERATORS:
            raise ConfigError(
                f"method.generation.backend={self.backend!r} is not one of "
                f"{{{', '.join(GENERATORS)}}}"
            )
        return self


def backend_names() -> tuple[str, ...]:
    return tuple(GENERATORS)


class OnPolicyOptions(Options):
    """The on-policy keys every distilling method shares, ``method.lmbda``, ``method.seq_kd``,
    ``method.generation.*``."""

    lmbda: float = Field(
        0.0,
        ge=0,
        le=1,
        description="fraction of training steps that are on-policy (completions sampled from "
        "the student), drawn per step from a seeded stream; 0 = off-policy (the data set's "
        "completions). Causal-LM tasks with prompt_completion or messages data (docs/on-policy.md)",
    )
    lmbda_start_step: int = Field(
        0,
        ge=0,
        description="distillation steps before the first on-policy one: an off-policy phase, "
        "for a student that does not yet write in-distribution text (0 = from the first step)",
    )
    lmbda_warmup_steps: int = Field(
        0,
        ge=0,
        description="from method.lmbda_start_step on, the on-policy share rises linearly to "
        "method.lmbda over this many steps (0 = method.lmbda at once)",
    )
    seq_kd: bool = Field(
        False,
        description="on the other steps, the teacher generates the completions instead of the "
        "data set (sequence-level KD)",
    )
    generation: GenerationOptions = Field(
        default_factory=GenerationOptions, description=GenerationOptions.__doc__.split("\n")[0]
    )

    @property
    def generates(self) -> bool:
        return self.lmbda > 0 or self.seq_kd


def check_onpolicy_config(cfg) -> None:
    """The experiment's constraints on on-policy keys (ConfigError naming the key)."""
    from ..tasks import get_task
    from .base import METHODS

    m = cfg.method
    if m.lmbda == 0:
        for key in ("lmbda_start_step", "lmbda_warmup_steps"):
            if getattr(m, key):
                raise ConfigError(
                    f"method.{key}={getattr(m, key)} schedules on-policy steps, but "
                    f"method.lmbda=0 has none: set method.lmbda > 0 or drop method.{key}"
                )
    if not m.generates:
        return
    key = "method.lmbda" if m.lmbda > 0 else "method.seq_kd"
    method = METHODS.get(m.name)
    if not method.on_policy:
        raise ConfigError(
            f"{key}: method {m.name!r} does not distil, so it has no on-policy form; use one of "
            f"{{{', '.join(n for n, c in METHODS.items() if c.on_policy)}}}"
        )
    t = cfg.data.task_type
    if t is None or not getattr(get_task(t), "generates", False):
        raise ConfigError(
            f"{key}: on-policy distillation samples completions from a decoder; it needs "
            f"data.task_type=causal_lm (got {t!r})"
        )
    if cfg.data.format == "text":
        raise ConfigError(
            f"{key}: data.format=text has no prompts to complete; use prompt_completion or messages"
        )


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


@dataclass
class GoldAnchor:
    """The teacher's objective on a step that trains on generated completions: ``kd_scale``
    times its KD term on the sampled sequences (LGTM: the influence term with it, which carries
    ``a_t`` off-policy too) plus ``ce_weight`` times its CE on ``gold``, the data set's
    micro-batches of the same prompts (row-weighted by ``weights``, so the CE is a mean over the
    global batch's gold tokens while the KD term is one over its generated tokens). Methods that
    train the teacher apply it per micro-batch before the teacher's backward
    (:meth:`kd` then :meth:`ce`); ``Distiller.gold_anchor`` is None off-policy, and the step is
    then untouched."""

    gold: list[dict]
    weights: list[float]
    kd_scale: float
    ce_weight: float
    ce_total: float = 0.0  # sum of the weighted CE values over the micro-batches so far

    def kd(self, loss):
        """The KD part of the teacher's loss (a tensor, or dL/dz) times ``kd_scale``."""
        return loss if self.kd_scale == 1.0 else loss * self.kd_scale

    def ce(self, j: int, teacher: Engine, task: Task) -> torch.Tensor | float:
        """``ce_weight * w_j * CE(teacher(gold_j))``, with graph (one teacher forward), to add
        to micro-batch ``j``'s teacher loss before its backward; 0.0 when the weight is 0."""
        if self.ce_weight == 0:
            return 0.0
        mb = self.gold[j]
        ce = task.task_loss(teacher.forward(mb), mb["labels"])
        ce = ce if self.weights[j] == 1.0 else ce * self.weights[j]
        self.ce_total += float(ce.detach())  # note: host sync, once per micro-batch
        return self.ce_weight * ce


class OnPolicy:
    """Decides per step whether it is on-policy and, if so, replaces the step's micro-batches
    with sampled ones (:meth:`prepare`). Its state (the steps drawn so far) is in the checkpoint,
    so that a resumed run draws and samples what the uninterrupted one did: the draw of step k
    and the sampling seed of micro-batch j of step k on rank r are functions of ``(seed, k)`` and
    ``(seed, k, r, j)`` only."""

    def __init__(
        self,
        distiller: Distiller,
        tokenizer,
        *,
        seed: int = 0,
        rank: int = 0,
        generator: Generator | None = None,
    ):
        self.d = distiller
        o = distiller.config
        pad_id, eos_id = check_generation_tokens(tokenizer)
        vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else None  # ids it can decode
        g = o.generation
        self.settings = GenerationSettings(
            g.temperature, g.top_p, g.max_new_tokens, pad_id, eos_id, vocab, g.zero3_gather
        )
        self.lmbda, self.seq_kd, self.sample_every = o.lmbda, o.seq_kd, g.sample_every
        self.start_step, self.warmup_steps = o.lmbda_start_step, o.lmbda_warmup_steps
        self.generator = generator or GENERATORS[g.backend]()
        self.seed, self.rank = seed, rank
        self.steps = 0  # steps drawn so far
        self.onpolicy_steps = 0
        self._sample_due = self.sample_every > 0
        # the objective on a sampled step: KD alone for both roles (module docstring); methods
        # may switch off more CE terms of their own (Method.onpolicy_overrides)
        self.config = distiller.config.model_copy(
            update={"alpha_student": 1.0, "alpha_teacher": 1.0}
        )
        for k, v in type(distiller.method).onpolicy_overrides().items():
            section = getattr(self.config, k).model_copy(update=v)
            self.config = self.config.model_copy(update={k: section})

    # -- state a resumed run needs -------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "steps": self.steps,
            "onpolicy_steps": self.onpolicy_steps,
            "sample_due": self._sample_due,
            "generator": self.generator.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        self.onpolicy_steps = int(state["onpolicy_steps"])
        self._sample_due = bool(state["sample_due"])
        self.generator.load_state_dict(state.get("generator") or {})

    # -- one step ------------------------------------------------------------------------------
    def lmbda_at(self, step: int) -> float:
        """The on-policy share of step ``step`` (counted from 0): 0 before
        ``lmbda_start_step``, then rising linearly over ``lmbda_warmup_steps`` steps (the first
        of them at ``lmbda / warmup``) to ``lmbda``."""
        k = step - self.start_step
        if self.lmbda <= 0 or k < 0:
            return 0.0
        if self.warmup_steps and k < self.warmup_steps:
            return self.lmbda * (k + 1) / self.warmup_steps
        return self.lmbda

    def draw(self, step: int) -> bool:
        """Whether step ``step`` (counted from 0) is on-policy: ``u < lmbda_at(step)`` with
        ``u`` uniform from a stream keyed by ``(seed, step)`` alone (the same on every rank)."""
        lmbda = self.lmbda_at(step)
        if lmbda <= 0:
            return False
        u = np.random.default_rng(np.random.SeedSequence([self.seed, _DRAW, step])).random()
        return bool(u < lmbda)

    def prepare(self, micro: list[dict]) -> tuple[list[dict], dict, str | None]:
        """``(micro-batches to train on, metrics, who generated)``: the data set's micro-batches
        unchanged (``who`` None) or sampled ones (``"student"`` / ``"teacher"``)."""
        k = self.steps
        self.steps += 1
        if self.sample_every and k % self.sample_every == 0:
            self._sample_due = True
        on = self.draw(k)
        self.onpolicy_steps += on
        metrics = {}
        if self.lmbda > 0:
            metrics["onpolicy"] = float(on)
            if self.start_step or self.warmup_steps:
                metrics["lmbda"] = self.lmbda_at(k)
            metrics["onpolicy_fraction"] = self.onpolicy_steps / self.steps
        who = "student" if on else ("teacher" if self.seq_kd else None)
        if who is None:
            return micro, metrics, None
        engine = self.d.student if who == "student" else self.d.teacher
        out, n_new, seconds, sample = [], 0, 0.0, None
        for j, mb in enumerate(micro):
            prompts = batch_prompts(mb)
            seed = _seed(self.seed, _SAMPLE, k, self.rank, j)
            got = self.generator.generate(engine, prompts, self.settings, seed)
            out.append(onpolicy_batch(prompts, got.completions, pad_id=self.settings.pad_id,
                                      like=mb))  # fmt: skip
            n_new += sum(len(c) for c in got.completions)
            seconds += got.seconds
            if j == 0 and self._sample_due and self.rank == 0:
                sample = [{"prompt": p, "completion": c} for p, c in zip(prompts, got.completions)]
        if sample is not None:
            self._sample_due = False
        rows = sum(mb["input_ids"].shape[0] for mb in micro)
        metrics["gen_len_mean"] = n_new / rows
        metrics["gen_tokens_per_s"] = n_new / seconds if seconds > 0 else float("nan")
        metrics["gen_s"] = seconds
        if sample is not None:
            metrics["generations"] = {"by": who, "rows": sample}
        return out, metrics, who
