"""Generation-based evaluation for decoders: greedy completions of held-out prompts, scored
against the reference completion (exact match, word F1).

An encoded causal-LM example (``input_ids``, ``labels`` with -100 where there is no loss) is
split at its first loss token: the tokens before it are the prompt, its first contiguous run of
loss tokens is the reference (for ``messages``: the first assistant turn, with everything
before it as the prompt). ``text``-format examples have no prompt and are not generated.

Both models complete the same prompts with Hugging Face ``generate`` (greedy, left-padded
batches, stops at EOS or ``max_new_tokens``). Scores compare decoded text, special tokens
skipped and surrounding whitespace stripped: ``exact_match`` (equal strings) and ``gen_f1``
(SQuAD-style F1 over whitespace-separated words).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator, Sequence

import torch

IGNORE_INDEX = -100


def prompt_and_reference(input_ids: Sequence[int], labels: Sequence[int]):
    """``(prompt ids, reference ids)`` of one encoded example, or None without a prompt (the
    first loss token is the first token) or without a loss token."""
    first = next((i for i, y in enumerate(labels) if y != IGNORE_INDEX), None)
    if first is None or first == 0:
        return None
    end = first
    while end < len(labels) and labels[end] != IGNORE_INDEX:
        end += 1
    return list(input_ids[:first]), list(input_ids[first:end])


def strip_at_eos(ids: Sequence[int], eos_id: int | None) -> list[int]:
    """The tokens before the first EOS (all of them without one)."""
    ids = list(ids)
    if eos_id is not None and eos_id in ids:
        ids = ids[: ids.index(eos_id)]
    return ids


def word_f1(prediction: str, reference: str) -> float:
    """SQuAD-style F1 of the whitespace-separated words (1.0 when both are empty)."""
    p, r = prediction.split(), reference.split()
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


# the token ids a neutral generation config keeps from the model's own (they name tokens, they
# do not change how the next one is chosen)
_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


@contextlib.contextmanager
def neutral_generation_config(model: torch.nn.Module) -> Iterator[None]:
    """Every Hugging Face model in ``model`` (a peft wrapper's base included) generates with a
    default ``GenerationConfig`` (the model's token ids kept) for the block, and gets its own
    back after. Hugging Face fills each key a call leaves at its default from the checkpoint's
    ``generation_config.json``, so an instruct model's ``do_sample: true``, ``temperature: 0.7``,
    ``top_p: 0.8`` or ``repetition_penalty: 1.05`` would turn greedy evaluation into sampling
    and sample on-policy rows at other settings than ``method.generation``'s."""
    from transformers import GenerationConfig

    saved = [
        (m, g)
        for m in model.modules()
        if isinstance(g := vars(m).get("generation_config"), GenerationConfig)
    ]
    for m, g in saved:
        m.generation_config = GenerationConfig(
            **{k: getattr(g, k) for k in _TOKEN_KEYS if getattr(g, k, None) is not None}
        )
    try:
        yield
    finally:
        for m, g in saved:
            m.generation_config = g


@torch.no_grad()
def greedy_complete(
    model,
    prompts: list[list[int]],
    *,
    pad_id: int,
    eos_id: int | None,
    max_new_tokens: int,
    synced_gpus: bool = False,
) -> list[list[int]]:
    """Greedy completions (new tokens only, cut at EOS) of ``prompts`` in one left-padded batch.
    ``synced_gpus``: keep stepping until every rank is done (ZeRO-3 across ranks, where every
    forward is a collective)."""
    device = next(model.parameters()).device
    n = max(len(p) for p in prompts)
    cfg = getattr(model, "config", None)
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if limit:  # absolute positions end there (rotary ones do not, but the model was not trained
        max_new_tokens = min(max_new_tokens, limit - n)  # past it either)
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    ids = torch.full((len(prompts), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), n), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, n - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, n - len(p) :] = 1
    with neutral_generation_config(model):
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
            synced_gpus=synced_gpus,
        )
    return [strip_at_eos(row[n:].tolist(), eos_id) for row in out.cpu()]
