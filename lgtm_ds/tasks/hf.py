"""Hugging Face model plumbing shared by the task types: configs loaded with clear errors, the
dropout override, seeded construction, and the embedded (config-built, no download) models."""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator

import torch
from transformers import AutoConfig, BertConfig, PretrainedConfig

from ..errors import ModelError

# Small BERTs for the embedded default experiment, unit tests and benchmarks (no download).
# "teacher"/"student": the default run trains in about a minute on 2 CPU cores.
EMBEDDED_BERT = {
    "teacher": dict(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512
    ),
    "student": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256
    ),
    "tiny": dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32),
    # the BERT-base -> 6-layer setting of the paper and the step benchmark, randomly initialised
    "bert-base": dict(),
    "bert-6l": dict(num_hidden_layers=6),
}


# Small decoders for causal-LM distillation (task type causal_lm), tests and benchmarks.
# Llama-shaped (RMSNorm, rotary, SwiGLU, grouped-query attention) for runs and benchmarks;
# GPT-2 blocks for float64 oracles (Llama's RMSNorm and rotary compute in fp32 even in a float64
# model, docs/algorithm.md). teacher ~7x the student's parameters at a 1-2k vocabulary.
def _llama(hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, **extra) -> tuple:
    """An embedded Llama-shaped decoder's config: hidden size, blocks, attention heads,
    key-value heads, feed-forward width (and any other LlamaConfig key)."""
    return "llama", dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=ffn,
        **extra,
    )


EMBEDDED_DECODERS = {
    "teacher": _llama(128, 6, 4, 2, 384),
    "student": _llama(64, 2, 2, 1, 128),
    "tiny": _llama(16, 1, 2, 1, 32),
    # the decoder-1b benchmark preset (GPU): a Llama-3.2-1B-shaped teacher (tied embeddings,
    # 1.24B at V = 128256) and a ~0.13B student (SmolLM-135M-like blocks, 16 layers, tied)
    "llama-1b": _llama(2048, 16, 32, 8, 8192, tie_word_embeddings=True),
    "llama-125m": _llama(576, 16, 9, 3, 1536, tie_word_embeddings=True),
    # bench_step's decoder-zero preset: 50M parameters, nearly all in the body
    "wide": _llama(1024, 4, 8, 8, 2560),
    "gpt2-teacher": ("gpt2", dict(n_embd=32, n_layer=2, n_head=2)),
    "gpt2-student": ("gpt2", dict(n_embd=16, n_layer=1, n_head=2)),
}
EMBEDDED_PREFIX = "embedded:"
_DROPOUT_KEYS = (
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "dropout",
    "attention_dropout",
    "classifier_dropout",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "summary_first_dropout",
)


def is_embedded(name_or_path: str) -> bool:
    return name_or_path.startswith(EMBEDDED_PREFIX)


def embedded_bert_config(
    name: str,
    *,
    vocab_size: int,
    num_labels: int,
    max_position: int = 512,
    dropout: float | None = None,
) -> BertConfig:
    """``BertConfig`` of ``embedded:<name>`` (``name`` without the prefix)."""
    if name not in EMBEDDED_BERT:
        raise ModelError(
            f"unknown embedded model '{EMBEDDED_PREFIX}{name}'; known: "
            f"{', '.join(EMBEDDED_PREFIX + k for k in EMBEDDED_BERT)}"
        )
    cfg = BertConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max_position,
        num_labels=num_labels,
        **EMBEDDED_BERT[name],
    )
    set_dropout(cfg, dropout)
    return cfg


def embedded_decoder_config(name: str, *, options, max_position: int = 512) -> PretrainedConfig:
    """``LlamaConfig`` / ``GPT2Config`` of ``embedded:<name>`` for a decoder task, sized for the
    tokenizer (``options.vocab_size``) and carrying its special token ids."""
    from transformers import GPT2Config, LlamaConfig

    if name not in EMBEDDED_DECODERS:
        raise ModelError(
            f"unknown embedded decoder '{EMBEDDED_PREFIX}{name}'; known: "
            f"{', '.join(EMBEDDED_PREFIX + k for k in EMBEDDED_DECODERS)}"
        )
    family, shape = EMBEDDED_DECODERS[name]
    o = options
    ids = dict(
        pad_token_id=o.pad_token_id, bos_token_id=o.bos_token_id, eos_token_id=o.eos_token_id
    )
    if family == "llama":
        shape = {"tie_word_embeddings": False, **shape}  # untied unless the entry says so
        cfg = LlamaConfig(
            vocab_size=o.vocab_size, max_position_embeddings=max_position, **ids, **shape
        )
    else:
        cfg = GPT2Config(vocab_size=o.vocab_size, n_positions=max_position, **ids, **shape)
    set_dropout(cfg, o.dropout)
    return cfg


def set_dropout(cfg: PretrainedConfig, dropout: float | None) -> None:
    """Every dropout probability the config has (hidden, attention, classifier) = ``dropout``."""
    if dropout is None:
        return
    for key in _DROPOUT_KEYS:
        if getattr(cfg, key, None) is not None:
            setattr(cfg, key, dropout)


def gguf_parts(name_or_path: str) -> tuple[str, str] | None:
    """``(folder, file name)`` of a GGUF checkpoint path (``.../model.Q4_1.gguf``), else None."""
    if not name_or_path.lower().endswith(".gguf"):
        return None
    path = os.path.abspath(os.path.expanduser(name_or_path))
    return os.path.dirname(path), os.path.basename(path)


def _need_gguf(key: str, name: str) -> None:
    import importlib.util

    missing = [m for m in ("gguf",) if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelError(
            f"{key} {name!r} is a GGUF checkpoint: reading it needs the '{missing[0]}' package "
            "(pip install 'lgtm-ds[gguf]')"
        )


def load_gguf_model(name: str, role: str, dropout: float | None = None) -> torch.nn.Module:
    """A GGUF checkpoint (e.g. a 4-bit llama.cpp file) dequantised by transformers into a plain
    fp32 ``AutoModelForCausalLM``: its config without the quantisation marker, so it trains,
    shards and saves (``save_pretrained``) like any other model."""
    from transformers import AutoModelForCausalLM

    folder, file = gguf_parts(name)
    key = f"model.{role}"
    if not os.path.isfile(os.path.join(folder, file)):
        raise ModelError(f"{key}: no such GGUF file {name!r}")
    _need_gguf(key, name)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file)
    except Exception as e:  # noqa: BLE001 - not a GGUF, an unsupported architecture, ...
        raise ModelError(
            f"{key}: cannot read {name!r} as a GGUF model checkpoint: {type(e).__name__}: {e}"
        ) from e
    cfg = copy.deepcopy(loaded.config)
    if "quantization_config" in cfg.__dict__:
        del cfg.quantization_config
    cfg.name_or_path = name
    set_dropout(cfg, dropout)
    plain = AutoModelForCausalLM.from_config(cfg)  # buffers (rotary tables) from the config
    plain.load_state_dict(loaded.state_dict(), strict=True)
    if getattr(cfg, "tie_word_embeddings", False):
        plain.tie_weights()
    del loaded
    return plain


def load_gguf_tokenizer(name: str, key: str):
    """The tokenizer stored in a GGUF checkpoint (vocabulary, special tokens, chat template)."""
    from transformers import AutoTokenizer

    folder, file = gguf_parts(name)
    _need_gguf(key, name)
    return AutoTokenizer.from_pretrained(folder, gguf_file=file)


def load_config(name_or_path: str, role: str) -> PretrainedConfig:
    """``AutoConfig.from_pretrained`` with one clear error: a missing local folder is named as
    such (not the hub's repo-id message), anything else says hub name or path and why."""
    gguf = gguf_parts(name_or_path)
    if gguf is not None:
        _need_gguf(f"model.{role}", name_or_path)
        try:
            return AutoConfig.from_pretrained(gguf[0], gguf_file=gguf[1])
        except Exception as e:  # noqa: BLE001
            raise ModelError(
                f"model.{role}: cannot read {name_or_path!r} as a GGUF model checkpoint: "
                f"{type(e).__name__}: {e}"
            ) from e
    looks_local = os.path.isabs(name_or_path) or name_or_path.startswith((".", "~"))
    if looks_local and not os.path.isdir(os.path.expanduser(name_or_path)):
        raise ModelError(f"model.{role}: no such model folder {name_or_path!r}")
    try:
        return AutoConfig.from_pretrained(os.path.expanduser(name_or_path))
    except Exception as e:  # noqa: BLE001 - hub unreachable, bad folder, ...
        raise ModelError(f"model.{role}: cannot load the config of {name_or_path!r}: {e}") from e


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block (model construction) from ``seed`` and leave the global RNG as it was, so
    the initialisation is a function of (config, seed) and dropout still follows train.seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def init_seed(seed: int, role: str) -> int:
    """The initialisation seed of one role (teacher and student differ)."""
    return 2 * seed + (role == "student")
