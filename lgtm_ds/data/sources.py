"""Where examples come from: the synthetic task, GLUE through ``datasets``, local files.

Three sources (``data.source``):

* ``"synthetic"``: the embedded default experiment (:mod:`lgtm_ds.data.synthetic`): train =
  ``data.synthetic_examples`` examples with ``data.synthetic_label_noise`` of the labels flipped;
  validation = ``max(200, 20%)`` noise-free examples from a different seed.
* ``"glue"``: ``datasets.load_dataset("nyu-mll/glue", task)`` for cola, sst2, mrpc, qqp, stsb,
  mnli, qnli, rte (eval split: ``validation``, ``validation_matched`` for mnli).
* ``"files"``: csv / json / jsonl / parquet ``train_file`` (+ ``validation_file``). Without a
  ``validation_file`` a seeded 10% of the training file is carved off as the eval split; its row
  indices are recorded in ``TaskData.eval_indices``.

The quiz split (the held-out batches LGTM's teacher update is scored on) is carved from the
training data with a seeded permutation (``quiz_source="train"``, indices recorded in
``TaskData.quiz_indices``, relative to the rows of the original training set/file), or is the
validation split (``quiz_source="validation"``).

A source yields :class:`RawSplits` (text columns + ``label``, the task type, label space and
metrics); the task type (:mod:`lgtm_ds.tasks`) encodes them into model inputs (truncated to
``data.max_length``, unpadded: the collator pads per batch).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import datasets
import numpy as np

from ..errors import DataError
from ..tasks import Task, get_task
from .synthetic import SYNTHETIC_LABEL_NAMES, synthetic_splits


class GlueTask(NamedTuple):
    text_columns: list[str]
    eval_split: str
    num_labels: int  # 1: regression
    metrics: list[str]


GLUE_DATASET_ID = "nyu-mll/glue"
GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask(["sentence"], "validation", 2, ["matthews"]),
    "sst2": GlueTask(["sentence"], "validation", 2, ["accuracy"]),
    "mrpc": GlueTask(["sentence1", "sentence2"], "validation", 2, ["f1", "accuracy"]),
    "qqp": GlueTask(["question1", "question2"], "validation", 2, ["f1", "accuracy"]),
    "stsb": GlueTask(["sentence1", "sentence2"], "validation", 1, ["pearson", "spearman"]),
    "mnli": GlueTask(["premise", "hypothesis"], "validation_matched", 3, ["accuracy"]),
    "qnli": GlueTask(["question", "sentence"], "validation", 2, ["accuracy"]),
    "rte": GlueTask(["sentence1", "sentence2"], "validation", 2, ["accuracy"]),
}
_FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
FILES_EVAL_FRACTION = 0.1
_ORIG = "__orig_idx__"

# Module-level hook so tests can feed fake datasets; load_task(_load_dataset=...) overrides it.
LOAD_DATASET: Callable[..., Any] = datasets.load_dataset


@dataclass
class RawSplits:
    """One dataset as a source delivers it: text columns + ``label``, before encoding."""

    name: str  # "synthetic", GLUE task name, or the train file stem
    train: datasets.Dataset
    eval: datasets.Dataset | None  # None: carve it off the training rows
    text_columns: list[str]
    task_type: str  # a registered task type: "classification" | "regression"
    num_labels: int
    metric_names: list[str]
    label_names: list[str] | None = None


@dataclass
class TaskData:
    """The encoded splits of one experiment and the task type that reads them."""

    name: str
    task: Task  # label space, metrics, losses, model head
    train: datasets.Dataset  # encoded: input_ids, attention_mask, (token_type_ids), labels
    quiz: datasets.Dataset  # same columns (held-out split the student never trains on)
    eval: datasets.Dataset  # same columns
    quiz_indices: list[int]  # rows of the original training set; [] for quiz_source "validation"
    quiz_source: str
    # Rows of the training file carved off as the eval split (files source without a
    # validation_file); [] otherwise.
    eval_indices: list[int] = field(default_factory=list)

    @property
    def num_labels(self) -> int:
        return self.task.num_labels

    def split_record(self) -> dict:
        """What ``data_split.json`` records of the split (sizes and the seeded indices)."""
        return {
            "task": self.name,
            "task_type": self.task.name,
            "quiz_source": self.quiz_source,
            "quiz_indices": self.quiz_indices,
            "eval_indices": self.eval_indices,
            "n_train": len(self.train),
            "n_quiz": len(self.quiz),
            "n_eval": len(self.eval),
        }


def _check_nonempty(ds: datasets.Dataset, what: str) -> None:
    if len(ds) == 0:
        raise DataError(f"{what} is empty (0 rows)")


def _check_columns(ds: datasets.Dataset, columns: list[str], where: str) -> None:
    for col in columns:
        if col not in ds.column_names:
            raise DataError(
                f"column {col!r} not found in {where}; its columns are {ds.column_names}"
            )


def _load_synthetic(cfg, load_fn, seed: int) -> RawSplits:
    train, val = synthetic_splits(cfg.synthetic_examples, seed, cfg.synthetic_label_noise)
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.Value("int64")}
    )
    return RawSplits(
        name="synthetic",
        train=datasets.Dataset.from_dict(train, features=features),
        eval=datasets.Dataset.from_dict(val, features=features),
        text_columns=["text"],
        task_type="classification",
        num_labels=len(SYNTHETIC_LABEL_NAMES),
        metric_names=["accuracy"],
        label_names=list(SYNTHETIC_LABEL_NAMES),
    )


def _load_glue(cfg, load_fn, seed: int) -> RawSplits:
    task = cfg.task.lower()
    if task not in GLUE_TASKS:
        raise DataError(
            f"data.task={cfg.task!r} is not a supported GLUE task; valid: {', '.join(GLUE_TASKS)}"
        )
    spec = GLUE_TASKS[task]
    try:
        dsd = load_fn(GLUE_DATASET_ID, task)
    except Exception as e:  # noqa: BLE001
        raise DataError(
            f"could not load GLUE task {task!r} ({GLUE_DATASET_ID}) from the Hugging Face Hub "
            f"(hub unreachable or dataset unavailable): {type(e).__name__}: {e}"
        ) from e
    for split in ("train", spec.eval_split):
        if split not in dsd:
            raise DataError(f"GLUE task {task!r}: split {split!r} missing; got {list(dsd.keys())}")
        where = f"GLUE task {task!r} split {split!r}"
        _check_columns(dsd[split], spec.text_columns + ["label"], where)
    feat = dsd["train"].features.get("label")
    names = list(feat.names) if isinstance(feat, datasets.ClassLabel) else None
    return RawSplits(
        name=task,
        train=dsd["train"],
        eval=dsd[spec.eval_split],
        text_columns=list(spec.text_columns),
        task_type="regression" if spec.num_labels == 1 else "classification",
        num_labels=spec.num_labels,
        metric_names=list(spec.metrics),
        label_names=names if spec.num_labels > 1 else None,
    )


def _load_file(path: str, load_fn, role: str) -> datasets.Dataset:
    ext = os.path.splitext(path)[1].lower()
    if ext not in _FILE_BUILDERS:
        raise DataError(
            f"data.{role}={path!r}: unsupported extension {ext!r}; use one of "
            f"{', '.join(_FILE_BUILDERS)}"
        )
    if not os.path.isfile(path):
        raise DataError(f"data.{role}: file not found: {path}")
    if os.path.getsize(path) == 0:
        split = "training" if role == "train_file" else "validation"
        raise DataError(f"{split} split ({path}) is empty (0 bytes, 0 rows)")
    with tempfile.TemporaryDirectory(prefix="lgtm_ds_cache_") as cache_dir:
        try:
            ds = load_fn(
                _FILE_BUILDERS[ext],
                data_files={"train": os.path.abspath(path)},
                split="train",
                cache_dir=cache_dir,
                keep_in_memory=True,
            )
        except Exception as e:  # noqa: BLE001
            if "corresponds to no data" in str(e):  # datasets' error for a 0-row file
                split = "training" if role == "train_file" else "validation"
                raise DataError(f"{split} split ({path}) is empty (0 rows)") from e
            raise DataError(
                f"data.{role}: could not read {path} as {_FILE_BUILDERS[ext]}: "
                f"{type(e).__name__}: {e}"
            ) from e
        if not ds.cache_files:
            return ds
        # Not in memory after all (e.g. a custom loader): materialise before the dir goes away.
        return datasets.Dataset.from_dict(ds.to_dict(), features=ds.features)


def _encode_file_labels(
    train: datasets.Dataset,
    val: datasets.Dataset | None,
    label_col: str,
    train_path: str,
    val_path: str | None,
):
    """(train labels, validation labels, num_labels, task type, label names): ints ->
    classification ids; strings/bools -> sorted ids; floats -> regression."""
    tr = train[label_col]
    va = val[label_col] if val is not None else []
    for values, path in ((tr, train_path), (va, val_path)):
        for i, v in enumerate(values):
            if v is None or (isinstance(v, float) and np.isnan(v)):
                raise DataError(f"column {label_col!r} of {path}: missing label in row {i}")
    kinds = {type(v) for v in list(tr) + list(va)}
    if kinds <= {float, int} and float in kinds:
        return [float(v) for v in tr], [float(v) for v in va], 1, "regression", None
    if kinds <= {int}:
        neg = [v for v in list(tr) + list(va) if v < 0]
        if neg:
            raise DataError(
                f"column {label_col!r}: integer labels must be >= 0 (class ids), got {neg[0]}"
            )
        num_labels = max(tr) + 1
        bad = [v for v in va if v >= num_labels]
        if bad:
            raise DataError(
                f"column {label_col!r} of {val_path}: label {bad[0]} does not occur in the "
                f"training file {train_path} (its labels are 0..{num_labels - 1})"
            )
        return list(tr), list(va), num_labels, "classification", None
    tr_s = [str(v) for v in tr]
    va_s = [str(v) for v in va]
    names = sorted(set(tr_s))
    mapping = {n: i for i, n in enumerate(names)}
    unseen = sorted(set(va_s) - set(names))
    if unseen:
        raise DataError(
            f"column {label_col!r} of {val_path}: label(s) {unseen} do not occur in the training "
            f"file {train_path} (its labels are {names})"
        )
    return (
        [mapping[v] for v in tr_s],
        [mapping[v] for v in va_s],
        len(names),
        "classification",
        names,
    )


def _load_files(cfg, load_fn, seed: int) -> RawSplits:
    cols = list(cfg.text_columns)
    paths = {"train_file": cfg.train_file, "validation_file": cfg.validation_file}
    loaded = {}
    for role, path in paths.items():
        if path is None:
            continue
        ds = _load_file(path, load_fn, role)
        _check_columns(ds, cols + [cfg.label_column], path)
        split = "training" if role == "train_file" else "validation"
        _check_nonempty(ds, f"{split} split ({path})")
        for col in cols:
            for i, v in enumerate(ds[col]):
                if v is None:
                    raise DataError(f"column {col!r} of {path}: missing text in row {i}")
        loaded[role] = ds
    train, val = loaded["train_file"], loaded.get("validation_file")
    tr_l, va_l, num_labels, task_type, names = _encode_file_labels(
        train, val, cfg.label_column, cfg.train_file, cfg.validation_file
    )
    label_feature = datasets.Value("float32" if task_type == "regression" else "int64")

    def relabel(ds, labels):
        ds = ds.select_columns(cols).map(
            lambda b: {c: [str(x) for x in b[c]] for c in cols}, batched=True, keep_in_memory=True
        )
        return ds.add_column("label", labels, feature=label_feature)

    return RawSplits(
        name=os.path.splitext(os.path.basename(cfg.train_file))[0],
        train=relabel(train, tr_l),
        eval=relabel(val, va_l) if val is not None else None,
        text_columns=cols,
        task_type=task_type,
        num_labels=num_labels,
        metric_names=list(get_task(task_type).default_metrics),
        label_names=names,
    )


_SOURCES = {"synthetic": _load_synthetic, "glue": _load_glue, "files": _load_files}


def _seeded_split(n: int, k: int, seed) -> tuple[list[int], list[int]]:
    """A seeded choice of ``k`` of ``n`` rows: (the ``k`` picked, the rest), each sorted."""
    perm = np.random.default_rng(seed).permutation(n)
    return sorted(int(i) for i in perm[:k]), sorted(int(i) for i in perm[k:])


def load_task(
    cfg, tokenizer, seed: int, *, _load_dataset: Callable[..., Any] | None = None
) -> TaskData:
    """Load, split and encode the dataset ``cfg`` (the ``data`` section) describes; see the
    module docstring. ``seed`` seeds the synthetic corpus and the carved splits."""
    load_fn = _load_dataset if _load_dataset is not None else LOAD_DATASET
    raw = _SOURCES[cfg.source](cfg, load_fn, seed)
    train = raw.train.add_column(_ORIG, list(range(len(raw.train))))
    _check_nonempty(train, f"training split of {raw.name!r}")
    train, val, eval_indices = _eval_split(train, raw, seed)
    if cfg.max_train_examples is not None:
        train = train.select(range(min(len(train), cfg.max_train_examples)))
    if cfg.max_eval_examples is not None:
        val = val.select(range(min(len(val), cfg.max_eval_examples)))
    _check_nonempty(val, f"validation split of {raw.name!r}")
    quiz, quiz_indices = val, []
    if cfg.quiz_source == "train":
        train, quiz, quiz_indices = _carve_quiz(train, raw.name, cfg.quiz_fraction, seed)
    train = train.remove_columns(_ORIG)

    task = get_task(raw.task_type)(
        num_labels=raw.num_labels, metric_names=raw.metric_names, label_names=raw.label_names
    )

    def encode(ds: datasets.Dataset) -> datasets.Dataset:
        return task.encode(ds, tokenizer, text_columns=raw.text_columns, max_length=cfg.max_length)

    eval_enc = encode(val)
    return TaskData(
        name=raw.name,
        task=task,
        train=encode(train),
        quiz=eval_enc if cfg.quiz_source == "validation" else encode(quiz),
        eval=eval_enc,
        quiz_indices=quiz_indices,
        quiz_source=cfg.quiz_source,
        eval_indices=eval_indices,
    )


def _eval_split(train: datasets.Dataset, raw: RawSplits, seed: int):
    """(train, eval, carved indices): the source's eval split, or (files without a
    validation_file) a seeded 10% of the training rows."""
    if raw.eval is not None:
        return train, raw.eval, []
    n = len(train)
    n_eval = max(1, int(round(FILES_EVAL_FRACTION * n)))
    if n_eval >= n:
        raise DataError(
            f"training split of {raw.name!r} has {n} row(s): too few to carve an eval split; "
            "set data.validation_file"
        )
    eval_indices, keep = _seeded_split(n, n_eval, [seed, 1])
    return train.select(keep), train.select(eval_indices).remove_columns(_ORIG), eval_indices


def _carve_quiz(train: datasets.Dataset, name: str, fraction: float, seed: int):
    """(train, quiz, quiz rows of the original training set): a seeded ``fraction``."""
    n = len(train)
    n_quiz = max(1, int(round(fraction * n)))
    if n_quiz >= n:
        raise DataError(
            f"training split of {name!r} has {n} row(s): too few to carve a quiz split of "
            f"data.quiz_fraction={fraction}"
        )
    quiz_pos, train_pos = _seeded_split(n, n_quiz, seed)
    orig = train[_ORIG]
    quiz_indices = [int(orig[i]) for i in quiz_pos]
    return train.select(train_pos), train.select(quiz_pos).remove_columns(_ORIG), quiz_indices
