"""Typed experiment configuration.

The YAML experiment file is a skin over this tree of dataclasses; ``--section.key=value`` on the
command line overrides it. The experiment owns batch sizes, accumulation, learning rates, the
schedule and the precision; the DeepSpeed JSON says ``"auto"`` for those.

Flow: ``load_config`` reads the YAML into a plain dict, applies the overrides to that dict, and
only then builds the dataclasses, so every ``__post_init__`` (type coercion + validation) sees the
final values. Nothing is ``setattr``-ed after construction.

``build_ds_config`` turns the experiment into one DeepSpeed dict per role (teacher / student).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import json
import math
import os
import sys
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from lgtm_ds.errors import ConfigError

DEFAULT_YAML = Path(__file__).resolve().parent / "assets" / "default.yaml"

# --------------------------------------------------------------------------------------------
# Validation helpers (each names the key with its section: "method.alpha_teacher ...")
# --------------------------------------------------------------------------------------------


def _check(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key} {rule}, got {value!r}")


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    _check(value in choices, key, f"must be one of {{{', '.join(choices)}}}", value)


def _check_range(
    key: str,
    value: float,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> None:
    """lo/hi bounds, closed unless *_open; also rejects nan / inf."""
    ok = math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if lo is not None and hi is not None:
        rule = f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    elif lo is not None:
        rule = f"must be {'>' if lo_open else '>='} {lo:g}"
    else:
        rule = f"must be {'<' if hi_open else '<='} {hi:g}"
    _check(ok, key, rule, value)


def _check_nonempty(key: str, value: Any) -> None:
    _check(isinstance(value, str) and value.strip() != "", key, "must be a non-empty string", value)


class _Section:
    """Mixin: coerce every field to its annotated type, then run the section's ``_validate``."""

    _SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            key = f"{self._SECTION}.{f.name}"
            object.__setattr__(self, f.name, _coerce(getattr(self, f.name), hints[f.name], key))
        self._validate()

    def _validate(self) -> None:  # pragma: no cover - overridden
        pass


# --------------------------------------------------------------------------------------------
# The tree
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig(_Section):
    _SECTION: ClassVar[str] = "model"
    # Hugging Face hub name, local path, or "embedded:teacher" / "embedded:student" (small BERTs
    # built from configs, no download).
    teacher: str = "embedded:teacher"
    student: str = "embedded:student"
    # Tokenizer name/path; None = the teacher's; "embedded" = the WordPiece tokenizer built offline
    # from the synthetic corpus.
    tokenizer: str | None = None
    # If set, overrides hidden and attention dropout of both models (0 for exact comparisons).
    dropout: float | None = None
    # The LGTM reference initialises both classification heads to zero.
    zero_init_classifier: bool = True

    def _validate(self) -> None:
        _check_nonempty("model.teacher", self.teacher)
        _check_nonempty("model.student", self.student)
        if self.tokenizer is not None:
            _check_nonempty("model.tokenizer", self.tokenizer)
        if self.dropout is not None:
            _check_range("model.dropout", self.dropout, 0.0, 1.0, hi_open=True)


DATA_SOURCES = ("synthetic", "glue", "files")
QUIZ_SOURCES = ("train", "validation")


@dataclass
class DataConfig(_Section):
    _SECTION: ClassVar[str] = "data"
    source: str = "synthetic"  # synthetic | glue | files
    task: str | None = None  # GLUE task name when source == "glue"
    train_file: str | None = None  # csv / json / jsonl / parquet when source == "files"
    validation_file: str | None = None
    text_columns: list[str] = field(default_factory=lambda: ["text"])  # one column, or two (pairs)
    label_column: str = "label"
    max_length: int = 128  # tokens per example after truncation; >= 8
    # Where the held-out quiz batches come from: "train" carves quiz_fraction of the training data
    # (seeded, indices recorded in the outputs); "validation" uses the dev set (explicit choice).
    quiz_source: str = "train"
    quiz_fraction: float = 0.1  # in (0, 0.5]
    synthetic_examples: int = 3000  # source == "synthetic": examples generated
    synthetic_label_noise: float = 0.1  # fraction of synthetic labels flipped, in [0, 1)
    max_train_examples: int | None = None  # truncate the train split (debugging); None = all
    max_eval_examples: int | None = None

    def _validate(self) -> None:
        _check_choice("data.source", self.source, DATA_SOURCES)
        if self.source == "glue":
            _check(
                self.task is not None and self.task.strip() != "",
                "data.task",
                "must name a GLUE task when data.source is 'glue'",
                self.task,
            )
        if self.source == "files":
            _check(
                self.train_file is not None and self.train_file.strip() != "",
                "data.train_file",
                "must be set when data.source is 'files'",
                self.train_file,
            )
        _check(
            1 <= len(self.text_columns) <= 2
            and all(isinstance(c, str) and c.strip() for c in self.text_columns),
            "data.text_columns",
            "must be 1 or 2 non-empty column names",
            self.text_columns,
        )
        _check_nonempty("data.label_column", self.label_column)
        _check(self.max_length >= 8, "data.max_length", "must be >= 8", self.max_length)
        _check_choice("data.quiz_source", self.quiz_source, QUIZ_SOURCES)
        _check_range("data.quiz_fraction", self.quiz_fraction, 0.0, 0.5, lo_open=True)
        _check(
            self.synthetic_examples > 0,
            "data.synthetic_examples",
            "must be > 0",
            self.synthetic_examples,
        )
        _check_range(
            "data.synthetic_label_noise", self.synthetic_label_noise, 0.0, 1.0, hi_open=True
        )
        for name in ("max_train_examples", "max_eval_examples"):
            v = getattr(self, name)
            _check(v is None or v > 0, f"data.{name}", "must be null or > 0", v)


METHODS = ("lgtm", "online_kd", "vanilla_kd")


@dataclass
class MethodConfig(_Section):
    _SECTION: ClassVar[str] = "method"
    name: str = "lgtm"  # lgtm | online_kd | vanilla_kd
    alpha_student: float = 1.0  # weight of the KD term in the student loss (rest is CE)
    alpha_teacher: float = 0.4  # weight of the KD term in the teacher loss (rest is its own CE)
    temperature: float = 1.0  # softmax temperature of the KD terms; > 0
    fd_radius: float = 1e-2  # finite-difference radius r; R = r / ||v||
    scale_by_t2: bool = False  # multiply KD terms by T^2 (the reference does not)
    teacher_stage1_epochs: float = 1.0  # vanilla_kd: epochs of teacher fine-tuning before stage 2

    def _validate(self) -> None:
        _check_choice("method.name", self.name, METHODS)
        _check_range("method.alpha_student", self.alpha_student, 0.0, 1.0)
        _check_range("method.alpha_teacher", self.alpha_teacher, 0.0, 1.0)
        _check_range("method.temperature", self.temperature, 0.0, lo_open=True)
        _check_range("method.fd_radius", self.fd_radius, 0.0, lo_open=True)
        _check_range("method.teacher_stage1_epochs", self.teacher_stage1_epochs, 0.0)


PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class TrainConfig(_Section):
    _SECTION: ClassVar[str] = "train"
    seed: int = 42
    epochs: float = 6.0
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    micro_batch_size: int = 32  # per rank
    gradient_accumulation_steps: int = 1
    student_lr: float = 5e-5
    teacher_lr: float = 3e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0  # linear warmup then linear decay to 0
    max_grad_norm: float = 0.0  # 0 disables clipping
    precision: str = "fp32"  # fp32 | bf16 | fp16
    eval_every: int = 100  # optimizer steps; 0 = only at the end
    eval_batch_size: int = 64
    log_every: int = 10

    def _validate(self) -> None:
        _check(self.seed >= 0, "train.seed", "must be >= 0", self.seed)
        _check_range("train.epochs", self.epochs, 0.0, lo_open=True)
        _check(
            self.max_steps is None or self.max_steps > 0,
            "train.max_steps",
            "must be null or > 0",
            self.max_steps,
        )
        for name in (
            "micro_batch_size",
            "gradient_accumulation_steps",
            "eval_batch_size",
            "log_every",
        ):
            _check(getattr(self, name) > 0, f"train.{name}", "must be > 0", getattr(self, name))
        for name in ("student_lr", "teacher_lr", "weight_decay", "max_grad_norm"):
            _check_range(f"train.{name}", getattr(self, name), 0.0)
        _check_range("train.warmup_ratio", self.warmup_ratio, 0.0, 1.0, hi_open=True)
        _check_choice("train.precision", self.precision, PRECISIONS)
        _check(self.eval_every >= 0, "train.eval_every", "must be >= 0", self.eval_every)


@dataclass
class DeepSpeedSection(_Section):
    _SECTION: ClassVar[str] = "deepspeed"
    config: str | None = None  # DeepSpeed JSON path (the --ds_config flag sets it)
    # Deep-merged into the role's dict, e.g. {"zero_optimization": {"stage": 3}} for the teacher.
    teacher: dict = field(default_factory=dict)
    student: dict = field(default_factory=dict)

    def _validate(self) -> None:
        if self.config is not None:
            _check_nonempty("deepspeed.config", self.config)
        for role in ("teacher", "student"):
            _check_str_keys(f"deepspeed.{role}", getattr(self, role))


def _check_str_keys(key: str, d: dict) -> None:
    for k, v in d.items():
        _check(isinstance(k, str), key, "must have string keys", k)
        if isinstance(v, dict):
            _check_str_keys(f"{key}.{k}", v)


@dataclass
class OutputConfig(_Section):
    _SECTION: ClassVar[str] = "output"
    dir: str = "outputs/lgtm-default"
    overwrite: bool = False  # allow writing into a non-empty dir
    save_teacher: bool = True  # also save the (co-trained) teacher at the end
    checkpoint_every: int = 0  # optimizer steps; 0 = no intermediate checkpoints
    resume: str | None = None  # checkpoint folder, or "auto" = latest under dir/checkpoints
    wandb: bool = False
    wandb_project: str = "lgtm-ds"
    run_name: str | None = None  # None = derived from the output dir

    def _validate(self) -> None:
        _check_nonempty("output.dir", self.dir)
        _check(
            self.checkpoint_every >= 0,
            "output.checkpoint_every",
            "must be >= 0",
            self.checkpoint_every,
        )
        if self.resume is not None:
            _check_nonempty("output.resume", self.resume)
        _check_nonempty("output.wandb_project", self.wandb_project)


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self) -> None:
        # Sections given as plain dicts are built (and validated) here too.
        hints = _hints(ExperimentConfig)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            cls = hints[f.name]
            if isinstance(value, dict):
                value = _build(cls, value, f.name)
                object.__setattr__(self, f.name, value)
            if not isinstance(value, cls):
                raise ConfigError(f"{f.name} must be a mapping, got {value!r}")


# --------------------------------------------------------------------------------------------
# Type coercion (annotations are strings: resolve them with typing.get_type_hints)
# --------------------------------------------------------------------------------------------

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


_NONE_STRINGS = ("null", "none", "~", "")
_TRUE = ("true", "1", "yes", "y", "on")
_FALSE = ("false", "0", "no", "n", "off")


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value or a command-line string to ``tp``; ConfigError if impossible."""

    original = value  # reported as given, even after parsing a string below

    def fail() -> typing.NoReturn:
        raise ConfigError(f"{key}: cannot convert {original!r} to {_type_name(tp)}")

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args:
            if value is None or (isinstance(value, str) and value.strip().lower() in _NONE_STRINGS):
                return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        fail()
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        fail()
    if tp is int:
        if isinstance(value, bool):
            fail()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            s = value.strip().replace("_", "")
            try:
                return int(s)
            except ValueError:
                try:
                    f = float(s)  # "1e3"
                except ValueError:
                    fail()
                if math.isfinite(f) and f.is_integer():
                    return int(f)
        fail()
    if tp is float:
        if isinstance(value, bool):
            fail()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-3" (no dot) as a string
            try:
                return float(value.strip())
            except ValueError:
                fail()
        fail()
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. run_name: 2024
        fail()
    if origin is list or tp is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            s = value.strip()
            if s.startswith("["):
                try:
                    value = yaml.safe_load(s)
                except yaml.YAMLError:
                    fail()
            else:
                value = [p.strip() for p in s.split(",") if p.strip()]
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            fail()
        if item_tp is Any:
            return list(value)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                fail()
            if value is None:
                value = {}
        if not isinstance(value, dict):
            fail()
        return copy.deepcopy(value)
    raise TypeError(f"{key}: unsupported annotation {tp!r}")  # programming error, not user input


# --------------------------------------------------------------------------------------------
# Building from a (merged) plain dict; unknown keys rejected with the full dotted key
# --------------------------------------------------------------------------------------------


def _unknown_key(dotted: str, valid: list[str]) -> ConfigError:
    name = dotted.rsplit(".", 1)[-1]
    section = dotted.rsplit(".", 1)[0] if "." in dotted else "the top level"
    msg = f"unknown key {dotted!r} (valid keys of {section}: {', '.join(valid)})"
    close = difflib.get_close_matches(name, valid, n=1)
    if close:
        msg += f"; did you mean {close[0]!r}?"
    return ConfigError(msg)


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'the config'} must be a mapping, got {data!r}")
    valid = _field_names(cls)
    for k in data:
        if k not in valid:
            raise _unknown_key(f"{prefix}.{k}" if prefix else str(k), valid)
    hints = _hints(cls)
    kwargs = {}
    for k, v in data.items():
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            v = _build(tp, v, f"{prefix}.{k}" if prefix else k)
        kwargs[k] = v
    return cls(**kwargs)


def _deep_merge(base: dict, over: dict) -> dict:
    """New dict: ``over`` wins; nested dicts merged recursively."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _field_type(dotted: str) -> tuple[Any, list[str]]:
    """Resolve ``section.key[.deep...]`` to (annotated type of section.key, deep parts)."""
    parts = dotted.split(".")
    if any(p == "" for p in parts):
        raise ConfigError(f"malformed key {dotted!r} (expected section.key)")
    top = _hints(ExperimentConfig)
    if parts[0] not in top:
        raise _unknown_key(parts[0], _field_names(ExperimentConfig))
    cls = top[parts[0]]
    if len(parts) == 1:
        return cls, []
    hints = _hints(cls)
    if parts[1] not in hints or parts[1] == "_SECTION":
        raise _unknown_key(f"{parts[0]}.{parts[1]}", _field_names(cls))
    tp = hints[parts[1]]
    if len(parts) > 2 and not (tp is dict or typing.get_origin(tp) is dict):
        raise ConfigError(
            f"{dotted!r}: {parts[0]}.{parts[1]} is a {_type_name(tp)}, it has no sub-keys"
        )
    return tp, parts[2:]


def _apply_override(data: dict, dotted: str, value: Any) -> None:
    """Set ``dotted`` in the plain dict ``data``.

    Values at ``section.key`` stay raw (strings are coerced when the dataclass is built).
    Deeper keys go inside a dict field (``deepspeed.teacher.zero_optimization.stage=3``); a
    string there is parsed as a YAML scalar/flow value so ``3`` becomes an int.
    A whole-section value (``train`` -> mapping) is applied key by key.
    """
    tp, deep = _field_type(dotted)
    parts = dotted.split(".")
    if len(parts) == 1:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError as e:
                raise ConfigError(f"{dotted}: cannot parse {value!r} as a mapping: {e}") from e
        if not isinstance(value, dict):
            raise ConfigError(f"{dotted}: cannot convert {value!r} to a mapping")
        for k, v in value.items():
            _apply_override(data, f"{dotted}.{k}", v)
        return
    section = data.get(parts[0])
    if section is None:  # absent, or an empty "train:" in the YAML
        section = data[parts[0]] = {}
    if not isinstance(section, dict):
        raise ConfigError(f"{parts[0]} must be a mapping, got {section!r}")
    if not deep:
        section[parts[1]] = value
        return
    current = section.get(parts[1])
    if current is None or not isinstance(current, dict):
        current = _coerce(current if current is not None else {}, dict, ".".join(parts[:2]))
    node = section[parts[1]] = current
    for p in deep[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value) if value.strip() else value
        except yaml.YAMLError:
            pass  # keep the raw string
    node[deep[-1]] = value


def _read_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"experiment YAML {str(path)!r} does not exist (or is not a file)")
    try:
        data = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"experiment YAML {str(path)!r} does not parse: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"experiment YAML {str(path)!r}: the top level must be a mapping of "
            f"sections, got {type(data).__name__}"
        )
    return data


def _override_pairs(overrides: list[str] | dict | None) -> list[tuple[str, Any]]:
    if overrides is None:
        return []
    if isinstance(overrides, dict):
        return [(str(k), v) for k, v in overrides.items()]
    pairs = []
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        k, v = item.split("=", 1)
        pairs.append((k.strip().removeprefix("--"), v))
    return pairs


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | dict | None = None
) -> ExperimentConfig:
    """Read the experiment YAML (None -> the embedded ``lgtm_ds/assets/default.yaml``), apply
    overrides in order (later wins), then build and validate the dataclass tree.

    ``overrides``: ``["train.student_lr=1e-3", ...]`` or ``{"train.student_lr": 1e-3}`` or nested
    ``{"train": {"student_lr": 1e-3}}``; deep keys into dict fields work
    (``deepspeed.teacher.zero_optimization.stage=3``).
    """
    data = _read_yaml(DEFAULT_YAML if path is None else path)
    for k, v in _override_pairs(overrides):
        _apply_override(data, k, v)
    return _build(ExperimentConfig, data, "")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

_USAGE = """usage: <script> [--config PATH] [--ds_config PATH] [--local_rank N]
                [--section.key=VALUE | --section.key VALUE ...]

Sections: model, data, method, train, deepspeed, output (see lgtm_ds/assets/default.yaml).
Overrides apply on top of the YAML, in order (later wins). Deep keys into deepspeed.teacher /
deepspeed.student work: --deepspeed.teacher.zero_optimization.stage=3
"""


def parse_args(argv: list[str] | None = None) -> tuple[ExperimentConfig, argparse.Namespace]:
    """Parse ``argv`` (default ``sys.argv[1:]``).

    Returns ``(cfg, args)``; ``args`` has ``config`` (YAML path or None), ``ds_config``,
    ``local_rank`` (int; the flag, else env LOCAL_RANK, else -1; not otherwise used) and
    ``overrides`` (the ``section.key=value`` strings in the order applied).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path: str | None = None
    ds_config: str | None = None
    local_rank: int | None = None
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok in ("-h", "--help"):
            print(_USAGE)
            raise SystemExit(0)
        if not tok.startswith("--") or tok == "--":
            raise ConfigError(
                f"unexpected command-line argument {tok!r} (flags look like --section.key=value)"
            )
        name, eq, value = tok[2:].partition("=")
        has_value = bool(eq)
        if not has_value and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value, has_value, i = argv[i + 1], True, i + 1
        i += 1
        if name in ("config", "ds_config", "local_rank", "local-rank"):
            if not has_value:
                raise ConfigError(f"--{name} needs a value")
            if name == "config":
                config_path = value
            elif name == "ds_config":
                ds_config = value
                overrides.append(f"deepspeed.config={value}")
            else:
                local_rank = _coerce(value, int, f"--{name}")
            continue
        if "." not in name:
            raise ConfigError(
                f"unknown flag '--{name}' (known: --config, --ds_config, "
                "--local_rank, --section.key=value with sections "
                f"{', '.join(_field_names(ExperimentConfig))})"
            )
        try:
            tp, deep = _field_type(name)
        except ConfigError as e:
            raise ConfigError(f"unknown flag '--{name}': {e}") from e
        if not has_value:
            if tp is bool and not deep:  # bare --output.overwrite means true
                value = "true"
            else:
                raise ConfigError(f"--{name} needs a value (--{name}=VALUE)")
        overrides.append(f"{name}={value}")
    if local_rank is None:
        local_rank = _coerce(os.environ.get("LOCAL_RANK", "-1"), int, "env LOCAL_RANK")
    cfg = load_config(config_path, overrides)
    ns = argparse.Namespace(
        config=config_path, ds_config=ds_config, local_rank=local_rank, overrides=overrides
    )
    return cfg, ns


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def config_to_dict(cfg: ExperimentConfig) -> dict:
    """Plain nested dict (YAML-dumpable); ``load_config`` of its dump gives back ``cfg``."""
    return dataclasses.asdict(cfg)


def save_resolved(
    cfg: ExperimentConfig, teacher_ds: dict, student_ds: dict, path: str | os.PathLike
) -> None:
    """Write ``{experiment, deepspeed_teacher, deepspeed_student}`` as one YAML, atomically
    (temp file in the same directory, fsync, ``os.replace``). Call it on rank 0 only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "experiment": config_to_dict(cfg),
        "deepspeed_teacher": copy.deepcopy(teacher_ds),
        "deepspeed_student": copy.deepcopy(student_ds),
    }
    text = yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# --------------------------------------------------------------------------------------------
# DeepSpeed dicts
# --------------------------------------------------------------------------------------------

# Used when deepspeed.config is None; equivalent to ds_configs/zero2.json.
DEFAULT_DS_CONFIG: dict = {
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
    "zero_optimization": {
        "stage": 2,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_scatter": True,
        "reduce_bucket_size": 50_000_000,
        "allgather_bucket_size": 50_000_000,
    },
    "steps_per_print": 10**9,
    "wall_clock_breakdown": False,
}
_BUILTIN = "<built-in ZeRO-2 default>"
ROLES = ("teacher", "student")


def _load_ds_json(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"DeepSpeed config {path!r} does not exist (deepspeed.config / --ds_config)"
        )
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"DeepSpeed config {path!r} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed config {path!r}: the top level must be a JSON object")
    return data


def _get_path(d: dict, keys: tuple[str, ...]) -> tuple[bool, Any]:
    node: Any = d
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            return False, None
        node = node[k]
    return True, node


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    return False


def build_ds_config(cfg: ExperimentConfig, role: str, world_size: int) -> dict:
    """The DeepSpeed config dict for ``role`` ("teacher" | "student").

    1. Load the JSON at ``cfg.deepspeed.config`` (None -> ``DEFAULT_DS_CONFIG``, ZeRO-2).
    2. Deep-merge ``cfg.deepspeed.<role>`` (YAML role overrides, e.g. a ZeRO-3 teacher).
    3. Resolve the values the experiment owns. Each may be absent or ``"auto"`` (filled in); a
       hard value equal to the experiment's is accepted; a different one is a ConfigError naming
       the source (JSON file or ``deepspeed.<role>``), the JSON key, both values and the YAML key.

       train_micro_batch_size_per_gpu <- train.micro_batch_size
       gradient_accumulation_steps    <- train.gradient_accumulation_steps
       train_batch_size               <- micro * accumulation * world_size
       gradient_clipping              <- train.max_grad_norm (0 = off)
       bf16.enabled / fp16.enabled    <- train.precision (fp16 also gets dynamic loss scaling
                                         defaults "loss_scale": 0, "initial_scale_power": 16)

    "optimizer" / "scheduler" sections are rejected: LGTM-DS passes DeepSpeed a client torch
    AdamW and a client LR scheduler built from train.* (the LGTM teacher update needs to own the
    optimizer), so a JSON optimizer would either be silently ignored or fight the client one.
    ``zero_optimization.stage`` must be 0..3. Any "auto" left elsewhere (e.g. model-size-dependent
    bucket sizes, which only HF Trainer fills) is an error: give a number.
    ``steps_per_print`` defaults to 10**9 (LGTM-DS logs itself) and ``wall_clock_breakdown`` to
    false, unless given.
    """
    if role not in ROLES:
        raise ConfigError(f"role must be one of {ROLES}, got {role!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world_size must be an int >= 1, got {world_size!r}")
    path = cfg.deepspeed.config
    if path is None:
        source, base = _BUILTIN, copy.deepcopy(DEFAULT_DS_CONFIG)
    else:
        source, base = path, _load_ds_json(path)
    role_over = getattr(cfg.deepspeed, role)
    role_source = f"deepspeed.{role} (experiment YAML)"

    for src, d in ((source, base), (role_source, role_over)):
        for section in ("optimizer", "scheduler"):
            if section in d:
                raise ConfigError(
                    f"{src}: has a section {section!r}, but the {section} is built by LGTM-DS "
                    f"from train.* (client torch AdamW + LR schedule); remove the section"
                )
        if "amp" in d:
            raise ConfigError(
                f"{src}: 'amp' is not supported; set train.precision "
                "(fp32 | bf16 | fp16) and remove the section"
            )
        if "bfloat16" in d:
            raise ConfigError(
                f"{src}: use the 'bf16' section (set by train.precision), not 'bfloat16'"
            )

    t = cfg.train
    owned: list[tuple[tuple[str, ...], Any, str]] = [
        (("train_micro_batch_size_per_gpu",), t.micro_batch_size, "train.micro_batch_size"),
        (
            ("gradient_accumulation_steps",),
            t.gradient_accumulation_steps,
            "train.gradient_accumulation_steps",
        ),
        (
            ("train_batch_size",),
            t.micro_batch_size * t.gradient_accumulation_steps * world_size,
            "train.micro_batch_size * train.gradient_accumulation_steps * "
            f"world_size({world_size})",
        ),
        (("gradient_clipping",), t.max_grad_norm, "train.max_grad_norm"),
        (("bf16", "enabled"), t.precision == "bf16", "train.precision"),
        (("fp16", "enabled"), t.precision == "fp16", "train.precision"),
    ]
    for src, d in ((source, base), (role_source, role_over)):
        for keys, want, yaml_key in owned:
            found, got = _get_path(d, keys)
            if not found or got == "auto":
                continue
            if not _same(got, want):
                shown = t.precision if yaml_key == "train.precision" else want
                hint = 'write "auto"' if src != role_source else "remove the key"
                raise ConfigError(
                    f"{src}: {'.'.join(keys)}={json.dumps(got)} conflicts with "
                    f"{yaml_key}={shown} (the experiment YAML owns it; {hint})"
                )

    ds = _deep_merge(base, role_over)
    for keys, want, _ in owned:
        node = ds
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = want
    if t.precision == "fp16":
        ds["fp16"].setdefault("loss_scale", 0)  # 0 = dynamic loss scaling
        ds["fp16"].setdefault("initial_scale_power", 16)

    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{source}: zero_optimization must be an object, got {zero!r}")
    if "stage" in zero:
        stage = zero["stage"]
        if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage <= 3:
            raise ConfigError(
                f"{source} + deepspeed.{role}: zero_optimization.stage must be "
                f"0, 1, 2 or 3, got {json.dumps(stage)}"
            )
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)

    leftover = _find_auto(ds)
    if leftover:
        raise ConfigError(
            f'{source} + deepspeed.{role}: {leftover}="auto" is not resolved by '
            "LGTM-DS (only batch sizes, accumulation, clipping and precision are); "
            "give a value"
        )
    return ds


def _find_auto(d: dict, prefix: str = "") -> str | None:
    for k, v in d.items():
        key = f"{prefix}{k}"
        if v == "auto":
            return key
        if isinstance(v, dict):
            hit = _find_auto(v, key + ".")
            if hit:
                return hit
    return None
