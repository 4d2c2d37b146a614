"""The embedded causal-LM task: generated instructions with one right completion (no download).

Five deterministic templates over a small vocabulary, chosen so that a tiny decoder (2 layers,
hidden 64) learns them in a few hundred CPU steps and the completion is a function of the
prompt (the clean ceiling is exact-match 100%):

* ``copy: w1 .. wk`` -> ``w1 .. wk``, ``reverse: w1 .. wk`` -> ``wk .. w1`` and
  ``last: w1 .. wk`` -> ``wk`` (k = 2-4 of 16 item words, repeats allowed): attention to
  positions;
* ``next after: three`` -> ``four`` (zero..nineteen): a fixed successor table;
* ``opposite of: hot`` -> ``cold``: a fixed word -> word mapping (12 pairs, both directions).

A prompt + completion is at most 12 tokens with the embedded decoder tokenizer (BOS and EOS
included). Generation is a function of (n, seed) (``numpy.random.default_rng``).
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError

_ITEMS = [
    "apple",
    "bird",
    "blue",
    "cat",
    "dog",
    "fish",
    "green",
    "leaf",
    "moon",
    "red",
    "rock",
    "snow",
    "star",
    "sun",
    "tree",
    "wind",
]
_NUMBERS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty"
).split()
_OPPOSITE_PAIRS = [
    ("hot", "cold"),
    ("big", "small"),
    ("up", "down"),
    ("day", "night"),
    ("fast", "slow"),
    ("old", "new"),
    ("open", "closed"),
    ("left", "right"),
    ("light", "dark"),
    ("early", "late"),
    ("happy", "sad"),
    ("full", "empty"),
]
_OPPOSITE = {a: b for a, b in _OPPOSITE_PAIRS} | {b: a for a, b in _OPPOSITE_PAIRS}
# (template, share of the examples)
_TEMPLATES = [("copy", 0.25), ("reverse", 0.25), ("last", 0.15), ("next", 0.15), ("opposite", 0.2)]
INSTRUCTION_VALIDATION_SEED_OFFSET = 1_000_003


def _example(rng: np.random.Generator, kind: str) -> tuple[str, str]:
    if kind in ("copy", "reverse", "last"):
        k = int(rng.integers(2, 5))
        words = [_ITEMS[i] for i in rng.integers(0, len(_ITEMS), size=k)]
        out = {"copy": words, "reverse": words[::-1], "last": words[-1:]}[kind]
        return f"{kind}: {' '.join(words)}", " ".join(out)
    if kind == "next":
        i = int(rng.integers(0, len(_NUMBERS) - 1))
        return f"next after: {_NUMBERS[i]}", _NUMBERS[i + 1]
    word = sorted(_OPPOSITE)[int(rng.integers(0, len(_OPPOSITE)))]
    return f"opposite of: {word}", _OPPOSITE[word]


def make_instruction_corpus(n: int, seed: int) -> dict[str, list]:
    """``{"prompt": [...], "completion": [...]}``: ``n`` examples, templates drawn with the
    shares of :data:`_TEMPLATES`; deterministic in (n, seed)."""
    if n <= 0:
        raise DataError(f"synthetic instruction corpus: n must be positive, got {n}")
    rng = np.random.default_rng(seed)
    kinds = [k for k, _ in _TEMPLATES]
    shares = np.array([s for _, s in _TEMPLATES])
    prompts, completions = [], []
    for k in rng.choice(len(kinds), size=n, p=shares / shares.sum()):
        p, c = _example(rng, kinds[int(k)])
        prompts.append(p)
        completions.append(c)
    return {"prompt": prompts, "completion": completions}


def synthetic_instruction_splits(n: int, seed: int) -> tuple[dict[str, list], dict[str, list]]:
    """(train, eval) of the instruction task: ``n`` examples, and ``max(100, 10%)`` from a
    different seed (the lookup templates have few distinct prompts, so some eval prompts also
    occur in train; the list templates rarely repeat)."""
    n_eval = max(100, int(round(0.1 * n)))
    return (
        make_instruction_corpus(n, seed),
        make_instruction_corpus(n_eval, seed + INSTRUCTION_VALIDATION_SEED_OFFSET),
    )


def synthetic_instruction_texts(n: int, seed: int) -> list[str]:
    """``prompt completion`` of the training examples: the corpus the embedded decoder tokenizer
    is built on (``build_tokenizer("embedded", ..., causal_lm=True)``)."""
    c = make_instruction_corpus(n, seed)
    return [f"{p} {q}" for p, q in zip(c["prompt"], c["completion"])]


def instruction_lexicon_text() -> str:
    """Every word of the task once, so each is a whole token whatever the corpus size."""
    words = set(_ITEMS) | set(_NUMBERS) | set(_OPPOSITE) | {k for k, _ in _TEMPLATES}
    words |= {"after", "of"}
    return " ".join(sorted(words)) + " :"
