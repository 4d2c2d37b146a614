"""Data: the synthetic task, tokenizers, sources (GLUE, files) and loaders.

- ``synthetic``: the generated review-sentiment corpus of the embedded default experiment.
- ``tokenizer``: a Hugging Face tokenizer by name/path, or the embedded WordPiece one.
- ``sources``: raw splits from the synthetic task, GLUE (``datasets``) or local files; the quiz
  and eval carving; encoding through the task type (``load_task``).
- ``loaders``: rank-sharded, seeded, resumable loaders and the trainer's global batches.
"""

from .loaders import GlobalBatches, InfiniteLoader, make_loader
from .sources import GLUE_TASKS, RawSplits, TaskData, load_task
from .synthetic import (
    SYNTHETIC_LABEL_NAMES,
    make_synthetic_corpus,
    synthetic_corpus_texts,
    synthetic_rule_label,
    synthetic_splits,
)
from .tokenizer import build_tokenizer

__all__ = [
    "GLUE_TASKS",
    "GlobalBatches",
    "InfiniteLoader",
    "RawSplits",
    "SYNTHETIC_LABEL_NAMES",
    "TaskData",
    "build_tokenizer",
    "load_task",
    "make_loader",
    "make_synthetic_corpus",
    "synthetic_corpus_texts",
    "synthetic_rule_label",
    "synthetic_splits",
]
