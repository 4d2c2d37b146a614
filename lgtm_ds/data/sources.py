"""Where examples come from: the synthetic task, GLUE through ``datasets``, local files, any
``datasets`` dataset.

Four sources (``data.source``):

* ``"synthetic"``: the embedded default experiment (:mod:`lgtm_ds.data.synthetic`): train =
  ``data.synthetic_examples`` examples with ``data.synthetic_label_noise`` of the labels flipped;
  validation = ``max(200, 20%)`` noise-free examples from a different seed.
* ``"glue"``: ``datasets.load_dataset("nyu-mll/glue", task)`` for cola, sst2, mrpc, qqp, stsb,
  mnli, qnli, rte (eval split: ``validation``, ``validation_matched`` for mnli).
* ``"files"``: csv / json / jsonl / parquet ``train_file`` (+ ``validation_file``). Without a
  ``validation_file`` a seeded 10% of the training file is carved off as the eval split; its row
  indices are recorded in ``TaskData.eval_indices``.
* ``"hub"``: ``datasets.load_dataset(data.dataset, data.dataset_config, split=...)`` (a hub name
  or a local dataset folder / script): ``data.train_split`` and ``data.eval_split`` (null: carve
  10% off as for files).

What a source delivers depends on what the task type reads (``Task.reads``; the sources ask
the task type, never its name): ``"labels"`` = text columns and one label per example (with
``data.task_type: null`` the labels pick the type: ``Task.labels`` "classes" or "values");
``"text"`` (decoders, e.g. ``data.task_type: causal_lm``) = the columns of ``data.format``
(:mod:`lgtm_ds.tasks.lm_data`: text / prompt_completion / messages, or auto-detected), no label
column; synthetic = the generated instruction task (:mod:`lgtm_ds.data.synthetic_lm`,
prompt_completion).

The quiz split (the held-out batches LGTM's teacher update is scored on) is carved from the
training data with a seeded permutation (``quiz_source="train"``, indices recorded in
``TaskData.quiz_indices``, relative to the rows of the original training set/file), or is the
validation split (``quiz_source="validation"``).

A source yields :class:`RawSplits` (text columns + ``label``, the task type, label space and
metrics); the task type (:mod:`lgtm_ds.tasks`) encodes them into model inputs (truncated to
``data.max_length``, unpadded: the collator pads per batch). A task type may drop rows while
encoding (causal_lm: rows left without a loss token after truncation); ``TaskData.dropped``
counts them per split.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import datasets
import numpy as np

from ..errors import ConfigError, DataError
from ..tasks import Task, get_task, task_for_labels
from ..tasks.base import SOURCE_INDEX
from ..tasks.lm_data import LMFormat, resolve_format
from .synthetic import SYNTHETIC_LABEL_NAMES, synthetic_corpus_texts, synthetic_splits
from .synthetic_lm import synthetic_instruction_splits, synthetic_instruction_texts


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
    """One dataset as a source delivers it: text columns + ``label`` (causal_lm: the columns of
    its format), before encoding."""

    name: str  # "synthetic", GLUE task name, the train file stem, or the hub dataset
    train: datasets.Dataset
    eval: datasets.Dataset | None  # None: carve it off the training rows
    text_columns: list[str]
    label_kind: str | None  # "classes" / "values" (reads "labels"); None: no label column
    num_labels: int | None  # None: no label column
    metric_names: list[str]  # [] = the task type's default metrics
    label_names: list[str] | None = None
    # extra keyword arguments of the task type's constructor (decoders: {"lm_format": ...})
    task_options: dict = field(default_factory=dict)
    task: type[Task] | None = None  # the task type that reads them (set by _raw_splits)


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
    # Rows the task type dropped while encoding, per split (train / quiz / eval): decoder rows
    # left without a loss token after truncation to data.max_length; 0 for classifiers.
    dropped: dict[str, int] = field(default_factory=dict)
    # data.test_file / data.test_split, encoded like eval; read once, after training
    test: datasets.Dataset | None = None

    @property
    def num_labels(self) -> int:
        return self.task.num_labels

    def split_record(self) -> dict:
        """What ``data_split.json`` records of the split (sizes and the seeded indices)."""
        return {
            "task": self.name,
            "task_type": self.task.name,
            "label_names": self.task.label_names,  # class id -> the label as in the data
            "quiz_source": self.quiz_source,
            "quiz_indices": self.quiz_indices,
            "eval_indices": self.eval_indices,
            "n_train": len(self.train),
            "n_quiz": len(self.quiz),
            "n_eval": len(self.eval),
            "n_test": len(self.test) if self.test is not None else 0,
            "dropped_by_truncation": {
                s: int(self.dropped.get(s, 0))
                for s in ("train", "quiz", "eval") + ("test",) * (self.test is not None)
            },
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
        label_kind="classes",
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
        label_kind="values" if spec.num_labels == 1 else "classes",
        num_labels=spec.num_labels,
        metric_names=list(spec.metrics),
        label_names=names if spec.num_labels > 1 else None,
    )


def check_files(cfg) -> None:
    """``data.source=files``: every file named has a readable extension and exists (the checks
    that read nothing; the trainer runs them before the ranks start)."""
    if cfg.source != "files":
        return
    for role in ("train_file", "validation_file", "test_file"):
        if getattr(cfg, role) is not None:
            _check_file(getattr(cfg, role), role)


def _check_file(path: str, role: str) -> None:
    ext = os.path.splitext(path)[1].lower()
    if ext not in _FILE_BUILDERS:
        raise DataError(
            f"data.{role}={path!r}: unsupported extension {ext!r}; use one of "
            f"{', '.join(_FILE_BUILDERS)}"
        )
    if not os.path.isfile(path):
        raise DataError(f"data.{role}: file not found: {path}")


def _load_file(path: str, load_fn, role: str) -> datasets.Dataset:
    _check_file(path, role)
    ext = os.path.splitext(path)[1].lower()
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
            at = _json_error(path) if ext in (".json", ".jsonl") else None
            raise DataError(
                f"data.{role}: could not read {path} as {_FILE_BUILDERS[ext]}: "
                + (at or f"{type(e).__name__}: {e}")
            ) from e
        if not ds.cache_files:
            return ds
        # Not in memory after all (e.g. a custom loader): materialise before the dir goes away.
        return datasets.Dataset.from_dict(ds.to_dict(), features=ds.features)


def _json_error(path: str) -> str | None:
    """Where a JSON / JSON-lines file stops parsing: ``line N, column C: <what>`` (the
    ``datasets`` reader's own message has no line number)."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as e:
        return f"{type(e).__name__}: {e}"
    try:
        json.loads(text)
        return None  # one JSON document that parses: the reader failed on something else
    except json.JSONDecodeError as whole:
        doc = f"line {whole.lineno}, column {whole.colno}: {whole.msg}"
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), "")
    try:
        json.loads(first)
    except json.JSONDecodeError:
        return doc  # not JSON lines (or its first line is the bad one): the document's error
    for n, line in enumerate(lines, 1):  # JSON lines: the first line that does not parse
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as e:
                return f"line {n}, column {e.colno}: {e.msg}"
    return doc


def _file_lines(path: str | None) -> list[int] | None:
    """The line of a CSV / JSON-lines file where each row (as ``datasets`` loads them: blank
    lines skipped, a CSV's header and quoted line breaks accounted for) starts; None for other
    files (parquet, a JSON document, a hub dataset)."""
    ext = os.path.splitext(path or "")[1].lower()
    if ext not in (".csv", ".json", ".jsonl") or not os.path.isfile(path):
        return None
    try:
        with open(path, newline="" if ext == ".csv" else None, encoding="utf-8") as fh:
            if ext != ".csv":
                lines = fh.read().splitlines()
                first = next((line for line in lines if line.strip()), "")
                try:
                    json.loads(first)
                except json.JSONDecodeError:
                    return None  # a JSON document over several lines: rows have no line
                return [n for n, line in enumerate(lines, 1) if line.strip()]
            out, header, start = [], True, 1
            reader = csv.reader(fh)
            for row in reader:
                if row:
                    if header:
                        header = False
                    else:
                        out.append(start)
                start = reader.line_num + 1
            return out
    except (OSError, UnicodeDecodeError, csv.Error):
        return None


def _at(path: str | None, rows: list[int]) -> str:
    """``line 57`` / ``lines 57, 91`` of ``path`` for 0-based rows, else ``row 55``."""
    lines = _file_lines(path)
    if lines is None or any(i >= len(lines) for i in rows):
        return ("row " if len(rows) == 1 else "rows ") + ", ".join(map(str, rows))
    return ("line " if len(rows) == 1 else "lines ") + ", ".join(str(lines[i]) for i in rows)


def _looks_numeric(v: Any) -> bool:
    """A number, or text that reads as a finite one ("1", " 2.5"): a CSV cell is text."""
    if isinstance(v, bool):
        return False
    if isinstance(v, int | float):
        return True
    if isinstance(v, str):
        try:
            return math.isfinite(float(v))
        except ValueError:
            return False
    return False


def _encode_file_labels(
    train: datasets.Dataset,
    val: datasets.Dataset | None,
    label_col: str,
    train_path: str,
    val_path: str | None,
    requested: type[Task] | None = None,
):
    """(train labels, validation labels, num_labels, label kind, label names) of a label column.

    - A task type reading ``"values"`` (``data.task_type: regression``): numbers as floats
      (anything else is an error).
    - Otherwise classes, unless some label is really fractional (1.5; then values, or an
      error if ``data.task_type`` names a task type of classes): integers and integral floats
      (0.0 / 1.0) are classes. Class values are mapped to contiguous ids in sorted order
      (numbers numerically, text alphabetically), so labels {0, 5} give 2 classes and {1, 2}
      do not leave an empty class 0; the label names (the original values as text) go into the
      models' ``id2label`` and ``data_split.json``.
    - A column mixing text and numbers is one error naming the odd values.
    """
    tr = list(train[label_col])
    va = list(val[label_col]) if val is not None else []
    for values, path in ((tr, train_path), (va, val_path)):
        for i, v in enumerate(values):
            if v is None or (isinstance(v, float) and np.isnan(v)):
                raise DataError(
                    f"column {label_col!r} of {path}: missing label at {_at(path, [i])}"
                )

    def is_num(v):
        return isinstance(v, int | float) and not isinstance(v, bool)

    everything = tr + va
    nums = [v for v in everything if is_num(v)]
    # typed numbers with text (JSON), else text that reads as numbers with other text (every
    # CSV cell is text): one kind of label per column
    numeric = is_num if nums and len(nums) != len(everything) else _looks_numeric
    flags = [numeric(v) for v in everything]
    if any(flags) and not all(flags):
        texts = sorted({str(v) for v, n in zip(everything, flags) if not n})
        numbers = sorted({str(v) for v, n in zip(everything, flags) if n}, key=float)
        odd_numeric = len(texts) > len(numbers)  # the odd ones out: the rarer kind of value
        odd = numbers if odd_numeric else texts
        where = []
        for values, path in ((tr, train_path), (va, val_path)):
            rows = [i for i, v in enumerate(values) if numeric(v) == odd_numeric][:5]
            if rows:
                where.append(f"{path} {_at(path, rows)}")
        raise DataError(
            f"column {label_col!r} mixes text labels {texts[:5]} with numeric labels "
            f"{numbers[:5]} ({train_path}{', ' + val_path if val_path else ''}); the odd ones "
            f"out: {odd[:5]} at {'; '.join(where)}. Use one kind of label per column"
        )
    fractional = any(isinstance(v, float) and not float(v).is_integer() for v in nums)
    kind = requested.labels if requested is not None else None
    if kind == "values" or (kind is None and fractional):
        if len(nums) != len(everything):
            name = requested.name if requested is not None else task_for_labels("values").name
            raise DataError(
                f"column {label_col!r}: data.task_type={name} needs numeric labels, got "
                f"{sorted({str(v) for v in everything})[:5]}"
            )
        return [float(v) for v in tr], [float(v) for v in va], 1, "values", None
    if fractional:
        ex = next(v for v in nums if not float(v).is_integer())
        raise DataError(
            f"column {label_col!r}: data.task_type={requested.name!r} needs class labels, got "
            f"the fractional value {ex}; set data.task_type={task_for_labels('values').name} "
            "(or null)"
        )
    if nums:
        key = [int(v) for v in tr], [int(v) for v in va]
        classes = sorted(set(key[0]))
        names = [str(c) for c in classes]
    else:
        key = [str(v) for v in tr], [str(v) for v in va]
        classes = sorted(set(key[0]))
        names = list(classes)
    unseen = sorted(set(key[1]) - set(classes))
    if unseen:
        raise DataError(
            f"column {label_col!r} of {val_path}: label(s) {unseen} do not occur in the training "
            f"file {train_path} (its labels are {names})"
        )
    ids = {c: i for i, c in enumerate(classes)}
    return [ids[v] for v in key[0]], [ids[v] for v in key[1]], len(classes), "classes", names


def _check_labelled(ds: datasets.Dataset, cols: list[str], label_col: str, where: str, what: str):
    """Text columns + label column present, rows present, no missing text."""
    _check_columns(ds, cols + [label_col], where)
    _check_nonempty(ds, what)
    for col in cols:
        for i, v in enumerate(ds[col]):
            if v is None:
                raise DataError(f"column {col!r} of {where}: missing text at {_at(where, [i])}")


def _load_files(cfg, load_fn, seed: int) -> RawSplits:
    paths = {"train_file": cfg.train_file, "validation_file": cfg.validation_file}
    loaded = {}
    for role, path in paths.items():
        if path is None:
            continue
        ds = _load_file(path, load_fn, role)
        split = "training" if role == "train_file" else "validation"
        _check_labelled(
            ds, list(cfg.text_columns), cfg.label_column, path, f"{split} split ({path})"
        )
        loaded[role] = ds
    return _labelled_splits(
        cfg,
        os.path.splitext(os.path.basename(cfg.train_file))[0],
        loaded["train_file"],
        loaded.get("validation_file"),
        cfg.train_file,
        cfg.validation_file,
    )


def _labelled_splits(cfg, name: str, train, val, train_where: str, val_where: str | None):
    """RawSplits of a classification / regression dataset (files, hub): the label column
    encoded by :func:`_encode_file_labels`, the text columns as strings."""
    cols = list(cfg.text_columns)
    requested = get_task(cfg.task_type) if cfg.task_type else None
    tr_l, va_l, num_labels, kind, names = _encode_file_labels(
        train, val, cfg.label_column, train_where, val_where, requested
    )
    label_feature = datasets.Value("float32" if kind == "values" else "int64")

    def relabel(ds, labels):
        ds = ds.select_columns(cols).map(
            lambda b: {c: [str(x) for x in b[c]] for c in cols}, batched=True, keep_in_memory=True
        )
        return ds.add_column("label", labels, feature=label_feature)

    return RawSplits(
        name=name,
        train=relabel(train, tr_l),
        eval=relabel(val, va_l) if val is not None else None,
        text_columns=cols,
        label_kind=kind,
        num_labels=num_labels,
        metric_names=[],
        label_names=names,
    )


def _hub_split(cfg, load_fn, key: str) -> datasets.Dataset:
    """``load_fn(data.dataset, data.dataset_config, split=data.<key>)`` as one Dataset."""
    split = getattr(cfg, key)
    try:
        ds = load_fn(cfg.dataset, cfg.dataset_config, split=split)
    except Exception as e:  # noqa: BLE001
        raise DataError(
            f"could not load data.dataset={cfg.dataset!r} (data.dataset_config="
            f"{cfg.dataset_config!r}, data.{key}={split!r}) from the Hugging Face Hub or a local "
            f"folder (hub unreachable, or dataset / config / split unavailable): "
            f"{type(e).__name__}: {e}"
        ) from e
    if not isinstance(ds, datasets.Dataset):
        raise DataError(
            f"data.dataset={cfg.dataset!r} split {split!r} (data.{key}) loaded as "
            f"{type(ds).__name__}, not a datasets.Dataset"
        )
    return ds


def _hub_where(cfg, key: str) -> str:
    return f"dataset {cfg.dataset!r} split {getattr(cfg, key)!r}"


def _load_hub(cfg, load_fn, seed: int) -> RawSplits:
    """A classification / regression dataset from ``datasets`` (text_columns + label_column),
    labels encoded as for files."""
    loaded = {}
    for key, what in (("train_split", "training"), ("eval_split", "validation")):
        if key == "eval_split" and cfg.eval_split is None:
            continue
        ds = _hub_split(cfg, load_fn, key)
        where = _hub_where(cfg, key)
        _check_labelled(
            ds, list(cfg.text_columns), cfg.label_column, where, f"{what} split ({where})"
        )
        loaded[key] = ds
    return _labelled_splits(
        cfg,
        cfg.dataset,
        loaded["train_split"],
        loaded.get("eval_split"),
        _hub_where(cfg, "train_split"),
        _hub_where(cfg, "eval_split") if cfg.eval_split is not None else None,
    )


_LABELLED_SOURCES = {
    "synthetic": _load_synthetic,
    "glue": _load_glue,
    "files": _load_files,
    "hub": _load_hub,
}


# ----------------------------------------------------------------- text (decoder formats)


def _lm_format(cfg, ds: datasets.Dataset, where: str, requested: str | None = None) -> LMFormat:
    fmt = resolve_format(
        requested or cfg.format,
        ds.column_names,
        text_column=cfg.text_columns[0],
        prompt_column=cfg.prompt_column,
        completion_column=cfg.completion_column,
        messages_column=cfg.messages_column,
        where=where,
    )
    if fmt.kind == "text" and len(cfg.text_columns) != 1:
        raise DataError(
            f"format 'text' reads one column, but data.text_columns={list(cfg.text_columns)}; "
            "give one column"
        )
    return fmt


def _check_lm_rows(ds: datasets.Dataset, fmt: LMFormat, where: str) -> None:
    """Missing text / messages, empty text or completion: one DataError naming the column, the
    file (dataset split) and the row as it is there (encoding only sees the carved splits)."""
    for col in fmt.columns:
        may_be_empty = col in (fmt.prompt_column, fmt.messages_column) and fmt.kind != "text"
        for i, v in enumerate(ds[col]):
            if v is None or (not may_be_empty and isinstance(v, str) and not v.strip()):
                what = "missing" if v is None else "empty"
                raise DataError(f"column {col!r} of {where}: {what} text at {_at(where, [i])}")


def _lm_raw(name: str, train, val, fmt: LMFormat) -> RawSplits:
    return RawSplits(
        name=name,
        train=train.select_columns(fmt.columns),
        eval=val.select_columns(fmt.columns) if val is not None else None,
        text_columns=fmt.columns,
        label_kind=None,
        num_labels=None,
        metric_names=[],
        task_options={"lm_format": fmt},
    )


def _load_synthetic_lm(cfg, load_fn, seed: int) -> RawSplits:
    """The generated instruction task (:mod:`lgtm_ds.data.synthetic_lm`): prompt_completion
    (DataConfig refuses another data.format for it)."""
    train, val = synthetic_instruction_splits(cfg.synthetic_examples, seed)
    features = datasets.Features(
        {"prompt": datasets.Value("string"), "completion": datasets.Value("string")}
    )
    return _lm_raw(
        "synthetic_instruction",
        datasets.Dataset.from_dict(train, features=features),
        datasets.Dataset.from_dict(val, features=features),
        LMFormat("prompt_completion"),
    )


def _load_files_lm(cfg, load_fn, seed: int) -> RawSplits:
    """csv / json / jsonl / parquet with the columns of ``data.format`` (no label column); the
    validation file must have the columns the training file's format reads."""
    train = _load_file(cfg.train_file, load_fn, "train_file")
    fmt = _lm_format(cfg, train, cfg.train_file)
    _check_nonempty(train, f"training split ({cfg.train_file})")
    _check_lm_rows(train, fmt, cfg.train_file)
    val = None
    if cfg.validation_file is not None:
        val = _load_file(cfg.validation_file, load_fn, "validation_file")
        _lm_format(cfg, val, cfg.validation_file, requested=fmt.kind)
        _check_nonempty(val, f"validation split ({cfg.validation_file})")
        _check_lm_rows(val, fmt, cfg.validation_file)
    return _lm_raw(os.path.splitext(os.path.basename(cfg.train_file))[0], train, val, fmt)


def _load_hub_lm(cfg, load_fn, seed: int) -> RawSplits:
    """A causal-LM dataset from ``datasets``: the columns of ``data.format``, as for files."""
    train = _hub_split(cfg, load_fn, "train_split")
    fmt = _lm_format(cfg, train, _hub_where(cfg, "train_split"))
    _check_lm_rows(train, fmt, _hub_where(cfg, "train_split"))
    val = None
    if cfg.eval_split is not None:
        val = _hub_split(cfg, load_fn, "eval_split")
        _lm_format(cfg, val, _hub_where(cfg, "eval_split"), requested=fmt.kind)
        _check_nonempty(val, f"validation split ({_hub_where(cfg, 'eval_split')})")
        _check_lm_rows(val, fmt, _hub_where(cfg, "eval_split"))
    return _lm_raw(cfg.dataset, train, val, fmt)


_TEXT_SOURCES = {"synthetic": _load_synthetic_lm, "files": _load_files_lm, "hub": _load_hub_lm}

# what a task type reads (Task.reads) -> the readers of each source
READERS: dict[str, dict[str, Callable[..., RawSplits]]] = {
    "labels": _LABELLED_SOURCES,
    "text": _TEXT_SOURCES,
}


def synthetic_texts(task: type[Task] | None, n: int, seed: int) -> list[str]:
    """The texts of the synthetic source for what ``task`` reads (None: labelled data): the
    corpus the offline tokenizer is trained on."""
    reads = task.reads if task is not None else "labels"
    return (synthetic_instruction_texts if reads == "text" else synthetic_corpus_texts)(n, seed)


def _raw_splits(cfg, load_fn, seed: int) -> RawSplits:
    """The source's RawSplits for ``data.task_type`` (null: whatever the labels say)."""
    requested = get_task(cfg.task_type) if cfg.task_type else None
    reads = requested.reads if requested is not None else "labels"
    readers = READERS[reads]
    if cfg.source not in readers:
        raise ConfigError(
            f"data.source={cfg.source!r} has no {cfg.task_type} form (data.task_type "
            f"{cfg.task_type!r} reads {reads}); use one of {', '.join(readers)}"
        )
    raw = readers[cfg.source](cfg, load_fn, seed)
    task = requested
    if reads == "labels":
        found = task_for_labels(raw.label_kind)
        if requested is not None and requested.labels != raw.label_kind:
            raise DataError(
                f"data.task_type={requested.name!r}, but the labels of {raw.name!r} make it a "
                f"{found.name!r} task; set data.task_type to null or {found.name!r}"
            )
        task = requested or found
    raw.task = task
    raw.metric_names = raw.metric_names or list(task.default_metrics)
    return raw


def _seeded_split(n: int, k: int, seed) -> tuple[list[int], list[int]]:
    """A seeded choice of ``k`` of ``n`` rows: (the ``k`` picked, the rest), each sorted."""
    perm = np.random.default_rng(seed).permutation(n)
    return sorted(int(i) for i in perm[:k]), sorted(int(i) for i in perm[k:])


def load_task(
    cfg, tokenizer, seed: int, *, _load_dataset: Callable[..., Any] | None = None
) -> TaskData:
    """Load, split and encode the dataset ``cfg`` (the ``data`` section) describes; see the
    module docstring. ``seed`` seeds the synthetic corpus and the carved splits.

    The task type may adjust the tokenizer first (``Task.prepare_tokenizer``: a decoder's
    tokenizer without a pad token pads with EOS)."""
    load_fn = _load_dataset if _load_dataset is not None else LOAD_DATASET
    raw = _raw_splits(cfg, load_fn, seed)
    train = raw.train.add_column(_ORIG, list(range(len(raw.train))))
    _check_nonempty(train, f"training split of {raw.name!r}")
    hint = "data.eval_split" if cfg.source == "hub" else "data.validation_file"
    train, val, eval_indices = _eval_split(train, raw, seed, hint)
    if cfg.max_train_examples is not None:
        train = train.select(range(min(len(train), cfg.max_train_examples)))
    if cfg.max_eval_examples is not None:
        val = val.select(range(min(len(val), cfg.max_eval_examples)))
    _check_nonempty(val, f"validation split of {raw.name!r}")
    quiz, quiz_indices = val, []
    if cfg.quiz_source == "train":
        train, quiz, quiz_indices = _carve_quiz(train, raw.name, cfg.quiz_fraction, seed)
    train = train.rename_column(_ORIG, SOURCE_INDEX)  # kept through encoding (telemetry)

    task = raw.task(
        num_labels=raw.num_labels,
        metric_names=raw.metric_names,
        label_names=raw.label_names,
        **raw.task_options,
    )
    task.prepare_tokenizer(tokenizer)
    dropped: dict[str, int] = {}

    def encode(ds: datasets.Dataset, split: str) -> datasets.Dataset:
        try:
            enc = task.encode(
                ds, tokenizer, text_columns=raw.text_columns, max_length=cfg.max_length
            )
        except DataError as e:
            raise DataError(f"{split} split of {raw.name!r}: {e}") from e
        dropped[split] = int(getattr(task, "last_encode_dropped", 0))
        return enc

    eval_enc = encode(val, "eval")
    train_enc = encode(train, "train")
    test_raw = _test_split(cfg, load_fn, seed)
    test_enc = encode(test_raw, "test") if test_raw is not None else None
    if cfg.quiz_source == "validation":
        quiz_enc, dropped["quiz"] = eval_enc, dropped["eval"]
    else:
        quiz_enc = encode(quiz, "quiz")
    carved = dict(quiz_indices=quiz_indices, quiz_source=cfg.quiz_source, eval_indices=eval_indices)
    return TaskData(
        raw.name, task, train_enc, quiz_enc, eval_enc, **carved, dropped=dropped, test=test_enc
    )


def _carve(train: datasets.Dataset, name: str, fraction: float, seed, what: str):
    """A seeded ``fraction`` of the training rows (at least one, leaving at least one):
    (positions carved, positions kept); ``what`` names the key to change when too few."""
    n = len(train)
    k = max(1, int(round(fraction * n)))
    if k >= n:
        raise DataError(f"training split of {name!r} has {n} row(s): too few to carve {what}")
    return _seeded_split(n, k, seed)


_AS_TEST = {  # the validation split's keys and words in a message, for the test split
    "files": (("data.validation_file", "data.test_file"), ("validation split", "test split")),
    "hub": (("data.eval_split", "data.test_split"), ("validation split", "test split")),
}


def _test_split(cfg, load_fn, seed: int) -> datasets.Dataset | None:
    """``data.test_file`` / ``data.test_split`` as the source reads a validation split (labels
    mapped like the training file's, the same format checks), or None. Errors name the test
    key."""
    if cfg.test_file is None and cfg.test_split is None:
        return None
    if cfg.source not in _AS_TEST:
        raise ConfigError(
            f"data.test_file / data.test_split apply to data.source files or hub, not "
            f"{cfg.source!r}"
        )
    key = "test_file" if cfg.source == "files" else "test_split"
    if getattr(cfg, key) is None:
        other = "test_split" if key == "test_file" else "test_file"
        raise ConfigError(f"data.source={cfg.source!r} reads data.{key}, not data.{other}")
    as_val = cfg.model_copy(update={"validation_file": cfg.test_file, "eval_split": cfg.test_split})
    try:
        test = _raw_splits(as_val, load_fn, seed).eval
    except (DataError, ConfigError) as e:
        msg = str(e)
        for a, b in _AS_TEST[cfg.source]:
            msg = msg.replace(a, b)
        raise type(e)(msg) from None
    return test  # the same training file, so the same sorted classes and label ids


def _eval_split(train: datasets.Dataset, raw: RawSplits, seed: int, hint: str):
    """(train, eval, carved indices): the source's eval split, or (files without a
    validation_file, hub without an eval_split) a seeded 10% of the training rows."""
    if raw.eval is not None:
        return train, raw.eval, []
    what = f"an eval split; set {hint}"
    eval_indices, keep = _carve(train, raw.name, FILES_EVAL_FRACTION, [seed, 1], what)
    return train.select(keep), train.select(eval_indices).remove_columns(_ORIG), eval_indices


def _carve_quiz(train: datasets.Dataset, name: str, fraction: float, seed: int):
    """(train, quiz, quiz rows of the original training set): a seeded ``fraction``."""
    what = f"a quiz split of data.quiz_fraction={fraction}"
    quiz_pos, train_pos = _carve(train, name, fraction, seed, what)
    orig = train[_ORIG]
    quiz_indices = [int(orig[i]) for i in quiz_pos]
    return train.select(train_pos), train.select(quiz_pos).remove_columns(_ORIG), quiz_indices
