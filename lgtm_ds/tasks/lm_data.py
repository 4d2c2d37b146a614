"""Causal-LM data: raw text / prompt+completion / chat messages -> ``input_ids``,
``attention_mask`` and ``labels`` with the loss mask, and the collator that pads them.

Conventions (Hugging Face): ``labels`` is aligned with ``input_ids`` (the model shifts: the
logits at position t predict ``labels[t + 1]``), ``-100`` marks a position without loss. A row's
*loss tokens* are therefore ``labels[1:] != -100`` (``labels[0]`` is never a target).

Formats (:class:`LMFormat`):

* ``text``: ``tokenizer(text)`` (its own special tokens, e.g. BOS) + EOS when the tokenizer has
  one and it is not already last; loss on every token.
* ``prompt_completion``: the tokenizer's special prefix (e.g. BOS) + the prompt's tokens, then
  the completion's tokens + EOS; loss on the completion and the EOS only. Prompt and completion
  are tokenized separately and their ids concatenated, so the boundary is exact (a merge across
  it cannot hide the first completion token inside a prompt token).
* ``messages``: a list of ``{"role", "content"}`` dicts rendered with the tokenizer's chat
  template; loss on the assistant turns only (see :func:`_assistant_spans`).

Rows are truncated to ``max_length`` keeping the start; a row left without a loss token is
dropped and counted. This module belongs to the task type and must not import
:mod:`lgtm_ds.data` (which imports the task types).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import DataError
from .base import SOURCE_INDEX

IGNORE_INDEX = -100
LM_FORMATS = ("text", "prompt_completion", "messages")
_KEYS = {
    "text": "data.text_columns",
    "prompt": "data.prompt_column",
    "completion": "data.completion_column",
    "messages": "data.messages_column",
}


@dataclass(frozen=True)
class LMFormat:
    """Which columns of a dataset a causal LM reads, and how (see the module docstring)."""

    kind: str  # "text" | "prompt_completion" | "messages"
    text_column: str = "text"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    messages_column: str = "messages"

    @property
    def columns(self) -> list[str]:
        """The columns this format reads."""
        if self.kind == "text":
            return [self.text_column]
        if self.kind == "prompt_completion":
            return [self.prompt_column, self.completion_column]
        return [self.messages_column]


def resolve_format(
    requested: str,
    column_names: Sequence[str],
    *,
    text_column: str = "text",
    prompt_column: str = "prompt",
    completion_column: str = "completion",
    messages_column: str = "messages",
    where: str,
) -> LMFormat:
    """The :class:`LMFormat` for ``requested`` (``data.format``) on a dataset with
    ``column_names`` (``where`` names it in errors). ``"auto"``: messages if that column exists,
    else prompt_completion if both its columns exist, else text. A missing column is one
    DataError naming the format, the column, its config key and the dataset's columns."""
    cols = list(column_names)
    fmt = LMFormat(
        kind=requested,
        text_column=text_column,
        prompt_column=prompt_column,
        completion_column=completion_column,
        messages_column=messages_column,
    )
    if requested == "auto":
        if messages_column in cols:
            kind = "messages"
        elif prompt_column in cols and completion_column in cols:
            kind = "prompt_completion"
        else:
            kind = "text"
        fmt = LMFormat(kind, text_column, prompt_column, completion_column, messages_column)
    elif requested not in LM_FORMATS:
        raise DataError(
            f"data.format={requested!r} is not a causal-LM format; valid: auto, "
            f"{', '.join(LM_FORMATS)}"
        )
    roles = {
        "text": [("text", text_column)],
        "prompt_completion": [("prompt", prompt_column), ("completion", completion_column)],
        "messages": [("messages", messages_column)],
    }[fmt.kind]
    if requested == "auto" and text_column not in cols and fmt.kind == "text":
        raise DataError(  # what auto looked for: naming only the last resort would mislead
            f"data.format=auto found no format it reads: it looks for {messages_column!r} "
            f"({_KEYS['messages']}) for messages, {prompt_column!r} and {completion_column!r} "
            f"({_KEYS['prompt']}, {_KEYS['completion']}) for prompt_completion, "
            f"{text_column!r} ({_KEYS['text']}) for text; the columns of {where} are {cols}"
        )
    for role, col in roles:
        if col not in cols:
            how = " (data.format=auto chose it)" if requested == "auto" else ""
            raise DataError(
                f"format {fmt.kind!r}{how}: column {col!r} ({_KEYS[role]}) not found in "
                f"{where}; its columns are {cols}"
            )
    return fmt


# ------------------------------------------------------------------------------ encoding


def _special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text's own tokens (e.g. ``[BOS]``; ``[]`` for
    tokenizers that add none): ``tokenizer("a")`` minus the tokens of ``"a"`` and what follows."""
    probe = "a"
    with_sp = list(tokenizer(probe)["input_ids"])
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    for k in range(len(with_sp) - len(plain) + 1):
        if with_sp[k : k + len(plain)] == plain:
            return with_sp[:k]
    return []


def _text(value, column: str, row: int, *, allow_empty: bool = False) -> str:
    if value is None or (not allow_empty and not str(value).strip()):
        what = "missing" if value is None else "empty"
        raise DataError(f"column {column!r}: {what} text in row {row}")
    return str(value)


def _messages(value, column: str, row: int) -> list[dict]:
    """A row's messages: a list of ``{"role", "content"}`` dicts (a JSON string is parsed, so
    a csv column works too)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise DataError(
                f"column {column!r} row {row}: not a list of messages (invalid JSON: {e})"
            ) from e
    if not isinstance(value, list) or not value:
        raise DataError(
            f"column {column!r} row {row}: expected a non-empty list of {{role, content}} "
            f"messages, got {type(value).__name__}"
        )
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise DataError(f"column {column!r} row {row}: message {j} has no 'role'")
        if not isinstance(m.get("content"), str):
            raise DataError(
                f"column {column!r} row {row}: message {j} ({m['role']}) has no text 'content'"
            )
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(
            f"column {column!r} row {row}: no assistant message, so nothing to learn from it"
        )
    return out


def _render(tokenizer, messages, row: int, column: str, **kw) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kw)
    except Exception as e:  # noqa: BLE001 - e.g. raise_exception() in the template
        raise DataError(
            f"column {column!r} row {row}: the chat template of the tokenizer cannot render "
            f"these messages: {type(e).__name__}: {e}"
        ) from e


def _assistant_spans(tokenizer, messages, row: int, column: str) -> tuple[str, list[tuple]]:
    """(the rendered conversation, the character spans of its assistant turns).

    Works for any chat template that renders a conversation as the concatenation of its turns:
    assistant turn i spans from the end of ``render(messages[:i], add_generation_prompt=True)``
    (so the role header the template writes is excluded) to the end of
    ``render(messages[:i + 1])`` (so the turn's end-of-turn marker, e.g. EOS, is included: the
    model learns to stop). A template whose renders are not prefixes of each other (one that
    rewrites earlier turns) is refused with a DataError."""
    full = _render(tokenizer, messages, row, column)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], row, column, add_generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1], row, column)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise DataError(
                f"column {column!r} row {row}: the tokenizer's chat template does not render a "
                "conversation as the concatenation of its turns, so the assistant turns cannot "
                "be located; use format prompt_completion or text"
            )
        spans.append((len(before), len(upto)))
    return full, spans


def _encode_messages(tokenizer, messages, row: int, column: str) -> tuple[list[int], list[int]]:
    """Token ids and labels of one conversation: the template's string is tokenized as a whole
    (it carries its own special tokens, the Hugging Face convention); a token is a loss token
    when its character offsets overlap an assistant span. A tokenizer without offsets (a slow
    one) tokenizes the pieces between span boundaries separately instead."""
    full, spans = _assistant_spans(tokenizer, messages, row, column)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = [
            t if b > a and any(a < e and b > s for s, e in spans) else IGNORE_INDEX
            for t, (a, b) in zip(ids, enc["offset_mapping"])
        ]
        return ids, labels
    ids, labels, pos = [], [], 0
    for s, e in [*spans, (len(full), len(full))]:
        for lo, hi, learn in ((pos, s, False), (s, e, True)):
            if hi > lo:
                part = tokenizer(full[lo:hi], add_special_tokens=False)["input_ids"]
                ids += part
                labels += list(part) if learn else [IGNORE_INDEX] * len(part)
        pos = e
    return ids, labels


def encode_lm(ds, tokenizer, fmt: LMFormat, *, max_length: int):
    """``(encoded dataset, rows dropped)``: ``ds`` tokenized in format ``fmt`` into unpadded
    ``input_ids`` / ``attention_mask`` / ``labels`` (see the module docstring), truncated to
    ``max_length`` tokens (the start is kept). Rows without a loss token after truncation are
    dropped and counted; if that is every row, a DataError names ``data.max_length``."""
    if fmt is None or fmt.kind not in LM_FORMATS:
        raise DataError(
            f"causal-LM encoding needs a resolved format ({', '.join(LM_FORMATS)}), got {fmt!r}"
        )
    if fmt.kind == "messages" and getattr(tokenizer, "chat_template", None) is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(
            f"tokenizer {name!r} has no chat template, which format 'messages' needs to render "
            f"column {fmt.messages_column!r}; use a tokenizer with a chat template, or format "
            "text / prompt_completion"
        )
    for col in fmt.columns:
        if col not in ds.column_names:
            raise DataError(
                f"format {fmt.kind!r}: column {col!r} not found; the columns are {ds.column_names}"
            )
    eos = tokenizer.eos_token_id
    prefix = _special_prefix(tokenizer) if fmt.kind == "prompt_completion" else []

    def with_eos(ids: list[int]) -> list[int]:
        return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids

    def one(batch, i: int, row: int) -> tuple[list[int], list[int]]:
        if fmt.kind == "text":
            text = _text(batch[fmt.text_column][i], fmt.text_column, row)
            ids = with_eos(list(tokenizer(text)["input_ids"]))
            return ids, list(ids)
        if fmt.kind == "prompt_completion":
            p = _text(batch[fmt.prompt_column][i], fmt.prompt_column, row, allow_empty=True)
            c = _text(batch[fmt.completion_column][i], fmt.completion_column, row)
            p_ids = prefix + list(tokenizer(p, add_special_tokens=False)["input_ids"])
            c_ids = with_eos(list(tokenizer(c, add_special_tokens=False)["input_ids"]))
            return p_ids + c_ids, [IGNORE_INDEX] * len(p_ids) + c_ids
        msgs = _messages(batch[fmt.messages_column][i], fmt.messages_column, row)
        return _encode_messages(tokenizer, msgs, row, fmt.messages_column)

    def fn(batch, indices):
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        keep_index = SOURCE_INDEX in batch
        if keep_index:
            out[SOURCE_INDEX] = []
        for i, row in enumerate(indices):
            ids, labels = one(batch, i, row)
            ids, labels = ids[:max_length], labels[:max_length]
            if all(t == IGNORE_INDEX for t in labels[1:]):
                continue  # no loss token left: dropped (counted below)
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append(labels)
            if keep_index:
                out[SOURCE_INDEX].append(batch[SOURCE_INDEX][i])
        return out

    enc = ds.map(
        fn,
        batched=True,
        with_indices=True,
        remove_columns=ds.column_names,
        keep_in_memory=True,
        load_from_cache_file=False,
    )
    dropped = len(ds) - len(enc)
    if len(ds) and not len(enc):
        raise DataError(
            f"all {len(ds)} rows have no loss token left after truncation to "
            f"data.max_length={max_length} (format {fmt.kind!r}); raise data.max_length"
        )
    return enc, dropped


# ------------------------------------------------------------------------------ collation


class CausalLMCollator:
    """``rows -> dict of tensors``: right-pads ``input_ids`` with the pad id, ``attention_mask``
    with 0 and ``labels`` with -100 to the longest row (rounded up to ``pad_to_multiple_of``).

    Right padding always (training with labels; the model never attends to the pad positions).
    A tokenizer without a pad token pads with its EOS id: the padded positions carry label -100
    and attention 0, so the id only has to be a valid embedding row."""

    def __init__(self, tokenizer, pad_to_multiple_of: int | None = None):
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id
        if pad is None:
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise DataError(f"tokenizer {name!r} has neither a pad nor an EOS token to pad with")
        self.pad_id = int(pad)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        n = max(len(r["input_ids"]) for r in rows)
        m = self.pad_to_multiple_of
        if m:
            n = -(-n // m) * m
        out = {}
        for key, fill in (("input_ids", self.pad_id), ("attention_mask", 0), ("labels", -100)):
            out[key] = torch.tensor(
                [list(r[key]) + [fill] * (n - len(r[key])) for r in rows], dtype=torch.long
            )
        if all(SOURCE_INDEX in r for r in rows):
            out[SOURCE_INDEX] = torch.tensor([int(r[SOURCE_INDEX]) for r in rows])
        return out
