"""Data: the synthetic tasks, tokenizers, sources (GLUE, files, hub) and loaders.

- ``synthetic``: the generated review-sentiment corpus of the embedded default experiment.
- ``synthetic_lm``: the generated instruction task of the embedded causal-LM experiment.
- ``tokenizer``: a Hugging Face tokenizer by name/path, or the embedded WordPiece one (encoder,
  or decoder with a chat template).
- ``sources``: raw splits from the synthetic tasks, GLUE (``datasets``), local files or any
  ``datasets`` dataset; the quiz and eval carving; encoding through the task type
  (``load_task``).
- ``loaders``: rank-sharded, seeded, resumable loaders and the trainer's global batches
  (optionally grouped by length).
"""

from .loaders import GlobalBatches, InfiniteLoader, LengthGroupedSampler, make_loader
from .sources import GLUE_TASKS, RawSplits, TaskData, load_task, synthetic_texts
from .synthetic import (
    SYNTHETIC_LABEL_NAMES,
    make_synthetic_corpus,
    synthetic_corpus_texts,
    synthetic_rule_label,
    synthetic_splits,
)
from .synthetic_lm import synthetic_instruction_splits, synthetic_instruction_texts
from .tokenizer import build_tokenizer, own_tokenizer

__all__ = [
    "GLUE_TASKS",
    "GlobalBatches",
    "InfiniteLoader",
    "LengthGroupedSampler",
    "RawSplits",
    "SYNTHETIC_LABEL_NAMES",
    "TaskData",
    "build_tokenizer",
    "own_tokenizer",
    "load_task",
    "make_loader",
    "make_synthetic_corpus",
    "synthetic_corpus_texts",
    "synthetic_instruction_splits",
    "synthetic_instruction_texts",
    "synthetic_rule_label",
    "synthetic_splits",
    "synthetic_texts",
]
