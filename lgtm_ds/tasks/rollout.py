"""On-policy sequences for decoders: the prompts of a causal-LM training batch, completed by a
generation backend, and the training batch built from both (docs/on-policy.md).

A collated causal-LM micro-batch (right-padded ``input_ids``, ``labels`` -100 where there is no
loss) splits per row at its first loss token: the tokens before it are the prompt (for
``messages`` data: the chat up to the first assistant turn). A :class:`Generator` completes the
prompts; :func:`onpolicy_batch` builds the micro-batch the methods train on, per row
``prompt + completion``, right-padded, ``labels`` = the completion's tokens up to and including
the first EOS (-100 on the prompt and on the padding). Sampled tokens are plain token ids: no
gradient flows through sampling. The methods get an ordinary micro-batch and never learn where
it came from.

The seam is :class:`Generator` (``generate(engine, prompts, settings, seed)``):
:class:`HFGenerator` (Hugging Face ``generate`` on the engine's own module, KV cache on) is the
one implemented. A backend that runs another engine (vLLM, colocated, its weights synced from
the training engine every k steps) would be another ``Generator``; docs/on-policy.md says how.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError, DataError
from .base import SOURCE_INDEX
from .generation import neutral_generation_config, prompt_and_reference

IGNORE = -100


@dataclass(frozen=True)
class GenerationSettings:
    """How one call samples: ``temperature`` 0 = greedy (argmax), else softmax(logits /
    temperature) cut to the smallest top-``top_p`` set (no top-k); at most ``max_new_tokens``
    new tokens per prompt, stopping at ``eos_id``; ``pad_id`` pads the prompts (on the left) and
    the sequences; ``vocab`` (if set) the ids that may be generated (an output layer padded past
    the tokenizer never emits its extra rows); ``zero3_gather``: a ZeRO-3 engine's parameters
    gathered once per call rather than per forward (:meth:`Engine.generation_params`)."""

    temperature: float
    top_p: float
    max_new_tokens: int
    pad_id: int
    eos_id: int
    vocab: int | None = None
    zero3_gather: bool = True


@dataclass
class Generated:
    """What a backend returns for one call: per prompt the new tokens (cut after the first EOS,
    which is kept) and the wall time the call took."""

    completions: list[list[int]]
    seconds: float


class Generator:
    """Completes prompts with one engine's model (the student, or the teacher with
    ``method.seq_kd``). Called on every rank once per micro-batch of an on-policy step, in the
    same order on every rank. ``seed`` fixes the sampling noise of the call (the same seed gives
    the same samples); a backend must not draw from the global RNGs, which training uses (dropout).

    A backend with weights of its own (vLLM) syncs them from ``engine.module`` when it decides
    to (e.g. every k calls); whatever it keeps between calls that a resumed run needs goes
    through :meth:`state_dict`."""

    name: str = ""

    def generate(
        self, engine, prompts: list[list[int]], settings: GenerationSettings, seed: int
    ) -> Generated:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@contextlib.contextmanager
def generation_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout), Hugging Face activation checkpointing off, no autograd; the
    module's train/eval flags and its checkpointing are restored on exit."""
    modes = [(m, m.training) for m in module.modules()]
    ckpt = [m for m in module.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in ckpt:
        m.gradient_checkpointing = False
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, was in modes:
            m.training = was
        for m in ckpt:
            m.gradient_checkpointing = True


class _Vocab:
    """Logits processor: ids at or past ``n`` (an output layer padded past the tokenizer) are
    never generated."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[-1] <= self.n:
            return scores
        scores = scores.clone()
        scores[:, self.n :] = -float("inf")
        return scores


class HFGenerator(Generator):
    """Hugging Face ``generate`` on the engine's module: :func:`generation_mode`, the KV cache,
    prompts left-padded in one batch (attention mask 0 on the padding, so positions start at
    each prompt's first token, as in the right-padded training batch). Sampling is the library's
    (``do_sample`` with ``temperature``, ``top_p``, ``top_k=0``, nothing else: the checkpoint's
    own generation settings are set aside, :func:`neutral_generation_config`) on a forked RNG
    seeded with ``seed``, so training's RNG streams are untouched. ZeRO-3: the parameters
    gathered once for the call (``zero3_gather``), or per forward, a collective, where
    ``synced_gpus`` keeps each rank stepping until every rank has finished
    (:meth:`Engine.generation_params`)."""

    name = "hf"

    def generate(self, engine, prompts, settings, seed):
        from transformers import GenerationConfig, LogitsProcessorList

        s = settings
        module = engine.module
        device = next(module.parameters()).device
        t0 = time.perf_counter()
        n = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), n), s.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), n), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, n - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, n - len(p) :] = 1
        sample = s.temperature > 0
        kw = dict(temperature=s.temperature, top_p=s.top_p, top_k=0) if sample else {}
        cfg = GenerationConfig(
            max_new_tokens=s.max_new_tokens,
            do_sample=sample,
            num_beams=1,
            use_cache=True,
            pad_token_id=s.pad_id,
            eos_token_id=s.eos_id,
            **kw,
        )
        procs = LogitsProcessorList([_Vocab(s.vocab)] if s.vocab else [])
        devices = [device] if device.type == "cuda" else []
        with (
            engine.generation_params(s.zero3_gather) as synced,
            generation_mode(module),
            neutral_generation_config(module),
            torch.random.fork_rng(devices=devices),
        ):
            torch.manual_seed(seed)
            out = module.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                generation_config=cfg,
                logits_processor=procs,
                synced_gpus=synced,
            )
        done = [cut_at_eos(row[n:].tolist(), s.eos_id) for row in out.cpu()]  # note: host sync
        return Generated(done, time.perf_counter() - t0)


GENERATORS: dict[str, type[Generator]] = {HFGenerator.name: HFGenerator}


def cut_at_eos(ids: Sequence[int], eos_id: int) -> list[int]:
    """The tokens up to and including the first EOS (all of them without one): the student
    learns where to stop, as on the data set's completions (which end with EOS). Hugging Face
    pads finished rows with the pad token, which is often EOS itself: cut there too."""
    ids = list(ids)
    return ids[: ids.index(eos_id) + 1] if eos_id in ids else ids


# ------------------------------------------------------------------------------------ batches


def batch_prompts(batch: dict) -> list[list[int]]:
    """The prompt of every row of a collated causal-LM micro-batch: its tokens before the
    first loss token. DataError naming the row when one has none (its loss starts at the first
    token, as with ``text`` data)."""
    out = []
    for i, (ids, labels) in enumerate(zip(batch["input_ids"].tolist(), batch["labels"].tolist())):
        pr = prompt_and_reference(ids, labels)
        if pr is None:
            row = int(batch[SOURCE_INDEX][i]) if SOURCE_INDEX in batch else i
            raise DataError(
                f"on-policy generation needs a prompt in every row; training row {row} has none "
                "(its loss starts at its first token, as with data.format=text): use "
                "data.format prompt_completion or messages, or method.lmbda=0 and "
                "method.seq_kd=false"
            )
        out.append(pr[0])
    return out


def onpolicy_batch(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    *,
    pad_id: int,
    like: dict | None = None,
) -> dict:
    """The training micro-batch of ``prompts[i] + completions[i]``: right-padded with
    ``pad_id`` to the longest row, ``attention_mask`` 1 on the real tokens, ``labels`` the
    completion's tokens and -100 on the prompt and the padding. ``like`` (the data-set
    micro-batch the prompts came from) gives the device and its ``source_index``."""
    rows = [[*p, *c] for p, c in zip(prompts, completions)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, rows)):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        attn[i, : len(r)] = 1
        labels[i, len(p) : len(r)] = ids[i, len(p) : len(r)]
    out = {"input_ids": ids, "attention_mask": attn, "labels": labels}
    if like is not None:
        device = like["input_ids"].device
        out = {k: v.to(device) for k, v in out.items()}
        if SOURCE_INDEX in like:
            out[SOURCE_INDEX] = like[SOURCE_INDEX]
    return out


def check_generation_tokens(tokenizer) -> tuple[int, int]:
    """``(pad id, eos id)`` of the run's tokenizer; ConfigError without an EOS token (samples
    stop there) or a pad token (prompts and sequences are padded)."""
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    for what, value in (
        ("an EOS token", tokenizer.eos_token_id),
        ("a pad token", tokenizer.pad_token_id),
    ):
        if value is None:
            raise ConfigError(
                f"on-policy generation (method.lmbda > 0 or method.seq_kd) needs a tokenizer "
                f"with {what}; tokenizer {name!r} has none (set one, or pick another with "
                f"model.tokenizer)"
            )
    return int(tokenizer.pad_token_id), int(tokenizer.eos_token_id)


def check_prompt_room(ds, max_new_tokens: int, max_length: int) -> None:
    """ConfigError unless the longest prompt of the encoded training set ``ds`` plus
    ``max_new_tokens`` fits in ``max_length`` tokens (the models' positions, the batch width)."""
    longest = 0
    for labels in ds["labels"]:
        first = next((i for i, y in enumerate(labels) if y != IGNORE), len(labels))
        longest = max(longest, first)
    if longest + max_new_tokens > max_length:
        raise ConfigError(
            f"method.generation.max_new_tokens={max_new_tokens} does not fit: the longest "
            f"training prompt has {longest} tokens and data.max_length is {max_length}; lower "
            f"method.generation.max_new_tokens to <= {max_length - longest} or raise "
            f"data.max_length"
        )
