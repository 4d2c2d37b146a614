"""The typed experiment tree: six frozen pydantic sections under :class:`ExperimentConfig`.

Each field's default is THE default (``configs/default.yaml`` is generated from them), its
``description`` documents it, its constraints (``ge``/``gt``/``le``/``lt``, ``Literal``) validate
it. A ``pydantic.ValidationError`` never reaches the user: :func:`config_error` turns it into one
``ConfigError`` naming the dotted key, the value and the rule, the rule worded from the field's
own constraints (:func:`rule`). A ``ConfigError`` raised inside a validator (the method
registry, the cross-field checks) passes through unchanged.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import os
import types
import typing
from collections.abc import Callable
from contextlib import suppress
from typing import Annotated, Any, Literal

import annotated_types as at
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from ..errors import ConfigError

# --------------------------------------------------------------------------------------------
# Lenient input: command-line strings and YAML scalars -> the field's type
# --------------------------------------------------------------------------------------------

NONE_STRINGS = ("null", "none", "~", "")


def _non_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("must be a non-empty string")
    return value


NonEmptyStr = Annotated[str, AfterValidator(_non_empty)]


def _strip(annotation: Any) -> tuple[Any, bool]:
    """``(annotation without None and Annotated, whether None is allowed)``."""
    nullable = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        nullable = type(None) in typing.get_args(annotation)
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation, nullable


def base_type(annotation: Any) -> tuple[Any, bool]:
    """``int | None`` -> ``(int, True)``, ``list[str]`` -> ``(list, False)``; a Literal stays."""
    annotation, nullable = _strip(annotation)
    origin = typing.get_origin(annotation)
    return (annotation if origin in (None, Literal) else origin), nullable


def type_name(annotation: Any) -> str:
    """``float | null``, ``list[str]``, ``dict``: the type as a user reads it."""
    if annotation is type(None):
        return "null"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is Annotated:
        return type_name(args[0])
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def _cannot_convert() -> PydanticCustomError:
    return PydanticCustomError("cannot_convert", "cannot convert the value")


def _yaml_value(text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise _cannot_convert() from None
    return {} if value is None else value  # "" / "null" for a dict field: empty


def lenient(value: Any, annotation: Any) -> Any:
    """What pydantic's lax mode does not do for us: "none"/"null"/"~"/"" -> None for an optional
    field, "1e3" -> 1000 for an int, a comma string -> list, a YAML flow string -> dict/list; a
    bool is refused for an int or float (pydantic would read True as 1)."""
    tp, nullable = base_type(annotation)
    if isinstance(value, str):
        s = value.strip()
        if nullable and s.lower() in NONE_STRINGS:
            return None
        if tp is float:
            with suppress(ValueError):
                return float(s)
        elif tp is int:
            with suppress(ValueError):
                return int(s)
            with suppress(ValueError):
                number = float(s)  # "1e3"
                if number.is_integer():
                    return int(number)
        elif tp is bool:
            return s
        elif tp is list and not s.startswith("["):
            return [p.strip() for p in s.split(",") if p.strip()]
        elif tp in (list, dict):
            parsed = _yaml_value(s)
            if not isinstance(parsed, tp):
                raise _cannot_convert()
            return parsed
    elif isinstance(value, bool) and tp in (int, float):
        raise _cannot_convert()
    return value


# --------------------------------------------------------------------------------------------
# ValidationError -> one ConfigError
# --------------------------------------------------------------------------------------------

_BOUNDS = (at.Gt, at.Ge, at.Lt, at.Le)


def rule(field: FieldInfo) -> str | None:
    """The field's constraint as a user reads it: ``in (0, 0.5]``, ``null or > 0``,
    ``one of {fp32, bf16, fp16}``; None if it has none."""
    tp, nullable = base_type(field.annotation)
    if typing.get_origin(tp) is Literal:
        text = f"one of {{{', '.join(map(str, typing.get_args(tp)))}}}"
    elif isinstance(field.json_schema_extra, dict) and "choices" in field.json_schema_extra:
        module, name = str(field.json_schema_extra["choices"]).split(":")
        names = getattr(importlib.import_module(module), name)()
        text = f"one of {{{', '.join(names)}}}"
    else:
        bounds = [m for m in field.metadata if isinstance(m, _BOUNDS)]
        b = {type(m): getattr(m, type(m).__name__.lower()) for m in bounds}
        lo = b.get(at.Gt, b.get(at.Ge))
        hi = b.get(at.Lt, b.get(at.Le))
        if lo is not None and hi is not None:
            text = f"in {'(' if at.Gt in b else '['}{lo:g}, {hi:g}{')' if at.Lt in b else ']'}"
        elif lo is not None:
            text = f"{'>' if at.Gt in b else '>='} {lo:g}"
        elif hi is not None:
            text = f"{'<' if at.Lt in b else '<='} {hi:g}"
        else:
            return None
    return f"null or {text}" if nullable else text


def unknown_key(dotted: str, valid: list[str]) -> ConfigError:
    name = dotted.rsplit(".", 1)[-1]
    owner = dotted.rsplit(".", 1)[0] if "." in dotted else "the top level"
    msg = f"unknown key {dotted!r} (valid keys of {owner}: {', '.join(valid)})"
    close = difflib.get_close_matches(name, valid, n=1)
    return ConfigError(msg + (f"; did you mean {close[0]!r}?" if close else ""))


def _dotted(loc: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


_RULE_ERRORS = (
    "literal_error",
    "greater_than",
    "greater_than_equal",
    "less_than",
    "less_than_equal",
    "finite_number",
)


def _locate(model: type[BaseModel], loc: tuple) -> tuple[type[BaseModel], FieldInfo | None, list]:
    """The model that owns the field at ``loc``, that field (None if loc ends at a model or
    names no field), and the rest of ``loc`` below the field (list indices, dict keys)."""
    owner, field, rest = model, None, list(loc)
    while rest and isinstance(rest[0], str) and rest[0] in owner.model_fields:
        field = owner.model_fields[rest.pop(0)]
        sub, _ = base_type(field.annotation)
        if not (rest and isinstance(sub, type) and issubclass(sub, BaseModel)):
            break
        owner, field = sub, None
    return owner, field, rest


def _message(err: dict, model: type[BaseModel], loc: tuple) -> str:
    """One pydantic error as a sentence: ``<key> must be <rule>, got <value>``,
    ``<key>: cannot convert <value> to <type>``, ``unknown key ...``."""
    key, value, kind = _dotted(loc), err["input"], err["type"]
    cause = (err.get("ctx") or {}).get("error")
    owner, field, rest = _locate(model, tuple(err["loc"]))
    if kind in ("extra_forbidden", "invalid_key"):
        return str(unknown_key(".".join(map(str, loc)), list(owner.model_fields)))
    if field is None:
        return f"{key or 'the config'}: {err['msg']}, got {value!r}"
    tp, _ = base_type(field.annotation)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return f"{key} must be a mapping, got {value!r}"
    if kind == "value_error":
        return f"{key} {cause}, got {value!r}"
    text = None if rest else rule(field)
    if kind in _RULE_ERRORS and text is not None:
        return f"{key} must be {text}, got {value!r}"
    if kind == "finite_number":
        return f"{key} must be a finite number, got {value!r}"
    annotation = field.annotation
    for _ in rest:  # into a list item or a dict value
        annotation = (typing.get_args(_strip(annotation)[0]) or (Any,))[-1]
    return f"{key}: cannot convert {value!r} to {type_name(annotation)}"


def config_error(
    exc: ValidationError,
    model: type[BaseModel],
    prefix: tuple = (),
    where: Callable[[tuple], str] | None = None,
) -> ConfigError:
    """One ConfigError for a ValidationError: one line per bad key (its first error).
    ``where(loc)`` may add e.g. `` (in exp.yaml)`` to the lines composed here."""
    lines: dict[str, str] = {}
    for err in exc.errors():
        loc = prefix + tuple(err["loc"])
        if _dotted(loc) in lines:
            continue
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, ConfigError):  # from a validator (registry, cross-field): as is
            lines[_dotted(loc)] = str(cause)
        else:
            lines[_dotted(loc)] = _message(err, model, loc) + (where(loc) if where else "")
    return ConfigError("\n".join(lines.values()))


# --------------------------------------------------------------------------------------------
# The tree
# --------------------------------------------------------------------------------------------


class _Model(BaseModel):
    """Frozen, unknown keys refused; construction errors become one ConfigError."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        coerce_numbers_to_str=True,  # run_name: 2024 -> "2024"
        allow_inf_nan=False,
    )

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            prefix = tuple(name for name, cls in SECTIONS.items() if cls is type(self))
            raise config_error(e, type(self), prefix) from None

    # Marked like pydantic's own __init__, pydantic does not call this one for a nested section:
    # validating a whole tree reports the errors of every section at once (with their file).
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]


class Section(_Model):
    """One section of the experiment; every field's raw value goes through :func:`lenient`."""

    @field_validator("*", mode="before")
    @classmethod
    def _lenient(cls, value: Any, info: ValidationInfo) -> Any:
        return lenient(value, cls.model_fields[info.field_name].annotation)


class ModelConfig(Section):
    teacher: NonEmptyStr = Field(
        "embedded:teacher",
        description="Hugging Face hub name, local path, or embedded:teacher (a small BERT built "
        "from a config, no download)",
    )
    student: NonEmptyStr = Field(
        "embedded:student",
        description="Hugging Face hub name, local path, embedded:student, or from_teacher (made "
        "from the teacher: student_layers / student_layer_stride / student_config)",
    )
    student_layers: list[int] | None = Field(
        None,
        description="student from_teacher: keep these teacher layers, weights copied "
        "(DistilBERT's initialisation), e.g. [0, 2, 4]",
    )
    student_layer_stride: int | None = Field(
        None,
        ge=1,
        description="student from_teacher: keep every k-th teacher layer from 0 (2: 0, 2, 4, ...)",
    )
    student_config: dict | None = Field(
        None,
        description="student from_teacher: a randomly initialised model of the teacher's "
        "architecture and vocabulary with these config overrides, e.g. {num_hidden_layers: 2, "
        "hidden_size: 256, intermediate_size: 1024}",
    )
    tokenizer: NonEmptyStr | None = Field(
        None,
        description="tokenizer name or path; null = the teacher's (the offline WordPiece "
        'tokenizer for an embedded: teacher); "embedded" = that offline WordPiece tokenizer',
    )
    dropout: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="null = the models' own; a number overrides hidden and attention dropout of "
        "both models, 0 for exact comparisons",
    )
    teacher_gradient_checkpointing: bool = Field(
        False,
        description="recompute the teacher's activations in its backward (Hugging Face "
        "activation checkpointing, non-reentrant): less activation memory for a second forward",
    )
    student_gradient_checkpointing: bool = Field(False, description="the same for the student")
    fused_head: bool = Field(
        True,
        description="decoders (causal_lm): every loss, the LGTM teacher gradient and evaluation "
        "from the models' last hidden states through their output layers, chunk by chunk of "
        "tokens (lgtm_kernels fused-linear ops), never the full [tokens, vocab] logits; false = "
        "full logits. Every method and ZeRO stage; not for a model whose logits are not its "
        "output layer on its decoder's states (soft-capped, scaled): full logits there",
    )
    fused_head_chunk: int | None = Field(
        None,
        ge=1,
        description="token rows per chunk of the fused head; null = 2^21 logits per chunk "
        "(64 rows at a 32000 vocabulary, 16 at 128256)",
    )
    zero_init_classifier: bool = Field(
        False,
        description="zero both classification heads, as the LGTM reference does for pre-trained "
        "BERTs; the embedded models start from random weights, where a zero head stalls learning",
    )

    @field_validator("teacher", "student", "tokenizer")
    @classmethod
    def _home(cls, value: str | None) -> str | None:
        return os.path.expanduser(value) if value and value.startswith("~") else value

    @model_validator(mode="after")
    def _student_from_teacher(self) -> ModelConfig:
        from ..tasks.derive import FROM_TEACHER

        keys = {
            "student_layers": self.student_layers,
            "student_layer_stride": self.student_layer_stride,
            "student_config": self.student_config,
        }
        given = [k for k, v in keys.items() if v is not None]
        if self.student == FROM_TEACHER and not given:
            raise ConfigError(
                f"model.student={FROM_TEACHER}: set model.student_layers (e.g. [0, 2, 4]), "
                "model.student_layer_stride or model.student_config"
            )
        if self.student != FROM_TEACHER and given:
            raise ConfigError(
                f"model.{given[0]} makes the student from the teacher: set model.student: "
                f"{FROM_TEACHER} (it is {self.student!r})"
            )
        if len(given) > 1:
            raise ConfigError(
                f"model.{given[0]} and model.{given[1]}: set one way to make the student"
            )
        if self.student_layers is not None:
            if not self.student_layers:
                raise ConfigError("model.student_layers is empty: list the teacher layers to keep")
            if min(self.student_layers) < 0 or len(set(self.student_layers)) != len(
                self.student_layers
            ):
                raise ConfigError(
                    f"model.student_layers {self.student_layers}: indices must be distinct and >= 0"
                )
        if self.student_config is not None and not self.student_config:
            raise ConfigError("model.student_config is empty: give the config keys to change")
        return self


class DataConfig(Section):
    source: Literal["synthetic", "glue", "files", "hub"] = Field(
        "synthetic",
        description="where the examples come from: synthetic = generated offline, glue = a GLUE "
        "task (data.task), files = local files (data.train_file), hub = a datasets hub name or "
        "local dataset folder (data.dataset)",
    )
    task_type: str | None = Field(
        None,
        description="task type, by its name in the registry of lgtm_ds.tasks; null = from the "
        "source (classification / regression by the labels); causal_lm for decoders (synthetic "
        "= the generated instruction task)",
        json_schema_extra={"choices": "lgtm_ds.tasks:task_names"},
    )
    task: str | None = Field(None, description="GLUE task name (source glue), e.g. sst2")
    train_file: str | None = Field(
        None, description="csv / json / jsonl / parquet training file (source files)"
    )
    validation_file: str | None = Field(None, description="dev set file (source files)")
    test_file: str | None = Field(
        None,
        description="test set file (source files), read once: both final models are evaluated "
        "on it after training (test/* in summary.json); never used for selection",
    )
    dataset: str | None = Field(
        None,
        description="datasets.load_dataset name on the hub, or a local dataset folder / script "
        "(source hub)",
    )
    dataset_config: str | None = Field(
        None, description="the dataset's configuration name (source hub); null = its default"
    )
    train_split: NonEmptyStr = Field("train", description="training split name (source hub)")
    eval_split: str | None = Field(
        None,
        description="eval split name (source hub); null = a seeded 10% of the training split "
        "carved off, as for files",
    )
    test_split: str | None = Field(
        None,
        description="test split name (source hub), read once after training like data.test_file",
    )
    text_columns: list[str] = Field(
        default_factory=lambda: ["text"],
        description="one text column, or two for sentence pairs (a list or a comma-separated "
        "string)",
    )
    label_column: NonEmptyStr = Field("label", description="integer class label column")
    format: Literal["auto", "text", "prompt_completion", "messages"] = Field(
        "auto",
        description="causal_lm only: text = text_columns[0], loss on every token; "
        "prompt_completion = loss on the completion; messages = chat turns rendered with the "
        "tokenizer's chat template, loss on assistant turns; auto = messages if that column "
        "exists, else prompt_completion if both its columns exist, else text",
    )
    prompt_column: NonEmptyStr = Field(
        "prompt", description="prompt column (causal_lm, format prompt_completion)"
    )
    completion_column: NonEmptyStr = Field(
        "completion", description="completion column (causal_lm, format prompt_completion)"
    )
    messages_column: NonEmptyStr = Field(
        "messages",
        description="column of {role, content} message lists (causal_lm, format messages)",
    )
    max_length: int = Field(
        64, ge=8, description="tokens per example after truncation (synthetic rows have <= 40)"
    )
    quiz_source: Literal["train", "validation"] = Field(
        "train",
        description="where the held-out quiz batches come from: train = quiz_fraction of it "
        "carved off (seeded, indices recorded in the outputs), validation = the dev set (an "
        "explicit choice)",
    )
    quiz_fraction: float = Field(
        0.1, gt=0, le=0.5, description="fraction of train carved off as the quiz set"
    )
    synthetic_examples: int = Field(
        3000, gt=0, description="number of synthetic examples generated (source synthetic)"
    )
    synthetic_label_noise: float = Field(
        0.1, ge=0, lt=1, description="fraction of synthetic labels flipped"
    )
    max_train_examples: int | None = Field(
        None, gt=0, description="cap the train split (debugging); null = all"
    )
    max_eval_examples: int | None = Field(None, gt=0, description="cap the eval split; null = all")
    group_by_length: bool = Field(
        False,
        description="training batches of examples of similar length (less padding): seeded "
        "megabatches of 50 global batches sorted by length",
    )

    @field_validator("train_file", "validation_file", "test_file", "dataset")
    @classmethod
    def _home(cls, value: str | None) -> str | None:
        return os.path.expanduser(value) if value and value.startswith("~") else value

    @field_validator("text_columns")
    @classmethod
    def _columns(cls, value: list[str]) -> list[str]:
        if not 1 <= len(value) <= 2 or not all(c.strip() for c in value):
            raise ValueError("must be 1 or 2 non-empty column names")
        return value

    @field_validator("task_type")
    @classmethod
    def _registered_task(cls, value: str | None) -> str | None:
        from ..tasks import task_names  # lazy: pulls torch

        if value is not None and value not in task_names():
            raise ConfigError(
                f"data.task_type must be null or one of {{{', '.join(task_names())}}}, "
                f"got {value!r}"
            )
        return value

    @model_validator(mode="after")
    def _source_needs(self) -> DataConfig:
        if self.source == "glue" and not (self.task or "").strip():
            raise ConfigError(
                f"data.task must name a GLUE task when data.source is 'glue', got {self.task!r}"
            )
        if self.source == "files" and not (self.train_file or "").strip():
            raise ConfigError(
                f"data.train_file must be set when data.source is 'files', got {self.train_file!r}"
            )
        if self.source == "hub" and not (self.dataset or "").strip():
            raise ConfigError(
                "data.dataset must name a datasets hub dataset or a local dataset folder when "
                f"data.source is 'hub', got {self.dataset!r}"
            )
        if self.task_type == "causal_lm" and self.source == "glue":
            raise ConfigError(
                "data.source='glue' has no causal_lm form (data.task_type 'causal_lm'); use "
                "synthetic, files or hub"
            )
        if (
            self.task_type == "causal_lm"
            and self.source == "synthetic"
            and self.format not in ("auto", "prompt_completion")
        ):
            raise ConfigError(
                f"data.format={self.format!r}: the synthetic instruction task (data.source "
                "'synthetic', data.task_type 'causal_lm') is prompt_completion; use auto or "
                "prompt_completion"
            )
        if self.format != "auto" and self.task_type in ("classification", "regression"):
            raise ConfigError(
                f"data.format={self.format!r} applies to data.task_type 'causal_lm' only, got "
                f"data.task_type={self.task_type!r}"
            )
        return self


class MethodConfig(Section):
    name: str = Field(
        "lgtm",
        description="distillation method, by its name in the registry of lgtm_ds.methods",
        # the registry is the one list of methods: the docs ask it (rule()), so does _registered
        json_schema_extra={"choices": "lgtm_ds.methods:method_names"},
    )
    alpha_student: float = Field(
        0.5,
        ge=0,
        le=1,
        description="weight of the KD term in the student loss (the rest is CE); the reference "
        "uses 1.0 with a pre-trained teacher, the embedded teacher starts random",
    )
    alpha_teacher: float = Field(
        0.4,
        ge=0,
        le=1,
        description="weight of the KD term in the teacher loss (the rest is its own CE)",
    )
    temperature: float = Field(1.0, gt=0, description="KD softmax temperature T")
    fd_radius: float = Field(1e-2, gt=0, description="finite-difference radius r; R = r / ||v||")
    scale_by_t2: bool = Field(
        False, description="multiply the KD terms by T^2 (the reference does not)"
    )
    jsd_beta: float = Field(
        0.0,
        ge=0,
        le=1,
        description="the student's KD divergence: 0 = forward KL(teacher || student) (the "
        "paper's), 1 = reverse KL, in between the generalised JSD with mixture weight beta "
        "(TRL GKD / Liger convention)",
    )
    teacher_jsd_beta: float | None = Field(
        None,
        ge=0,
        le=1,
        description="the same for the teacher's KD term (the student's prediction is its "
        "target); null = jsd_beta",
    )
    teacher_stage1_epochs: float = Field(
        1.0,
        ge=0,
        description="vanilla_kd only: epochs of teacher fine-tuning before distillation",
    )
    influence_scale: float = Field(
        1.0,
        ge=0,
        description="lgtm only: multiplier on the influence term eta * h of the teacher update "
        "(1.0 = the paper and the reference: eta = the teacher's learning rate; 0 = online KD "
        "with the same passes)",
    )
    influence_ratio_target: float | None = Field(
        None,
        gt=0,
        description="lgtm only: set eta adaptively so that influence_ratio = |eta grad h| / "
        "|grad L_t| (the influence term's share of the teacher gradient) is this value: eta = "
        "target / EMA of the measured |grad h| / |grad L_t|, measured every "
        "influence_ratio_every steps (the first step uses influence_scale); null = off",
    )
    influence_ratio_every: int | None = Field(
        None,
        ge=0,
        description="lgtm only: measure influence_ratio every N optimizer steps (one extra "
        "teacher forward and two backwards, two fp32 copies of the teacher's gradient); null = "
        "every train.log_every steps; 0 = never",
    )
    pilot_lr: float | None = Field(
        None,
        gt=0,
        description="metadistil only: learning rate of the pilot student's simulated SGD step; "
        "null = the student's current learning rate",
    )
    teacher_ce_weight: float = Field(
        0.0,
        ge=0,
        description="metadistil only: weight of the teacher's own CE next to the pilot "
        "student's quiz loss (0 = MetaDistil as published: the quiz loss only)",
    )

    hidden_weight: float = Field(
        0.0,
        ge=0,
        description="weight of the hidden-state (intermediate-layer) distillation term, any "
        "method; 0 = off (lgtm_ds/methods/hidden.py)",
    )
    hidden_layers: list[str] | None = Field(
        None,
        description='layer map, "student_block:teacher_block" pairs counted from 1, e.g. '
        '["1:2", "2:4"]; null = the skip map j = round(i * L_teacher / L_student)',
    )
    hidden_loss: Literal["mse", "cosine"] = Field(
        "mse", description="hidden-state distance: mean squared error, or 1 - cosine"
    )
    hidden_positions: Literal["all", "first"] = Field(
        "all",
        description="positions compared: every attended token, or the first only (PKD's [CLS], "
        "classifiers)",
    )

    @field_validator("hidden_layers")
    @classmethod
    def _layer_map(cls, value: list[str] | None) -> list[str] | None:
        from ..methods.hidden import parse_layers  # lazy: pulls torch

        parse_layers(value)  # ConfigError naming method.hidden_layers
        return value

    @field_validator("name")
    @classmethod
    def _registered(cls, value: str) -> str:
        from ..methods import get_method  # lazy: pulls torch

        get_method(value)  # ConfigError naming the registered methods
        return value


class TrainConfig(Section):
    seed: int = Field(42, ge=0, description="seeds the data split, model init and dropout")
    epochs: float = Field(6.0, gt=0, description="training epochs (ignored when max_steps is set)")
    max_steps: int | None = Field(
        300, gt=0, description="optimizer steps; overrides epochs; null = derive from epochs"
    )
    micro_batch_size: int = Field(
        32, gt=0, description='examples per rank per micro-step (DeepSpeed: "auto")'
    )
    gradient_accumulation_steps: int = Field(
        1, gt=0, description='micro-steps per optimizer step (DeepSpeed: "auto")'
    )
    student_lr: float = Field(
        1e-3,
        ge=0,
        description="student AdamW peak learning rate (3e-3 collapses the embedded student)",
    )
    teacher_lr: float = Field(1e-3, ge=0, description="teacher AdamW peak learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (both models)")
    warmup_ratio: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="fraction of steps of linear warmup, then linear decay to 0",
    )
    max_grad_norm: float = Field(
        0.0, ge=0, description='gradient clipping norm; 0 = off (DeepSpeed: "auto")'
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="training precision; sets the DeepSpeed bf16 / fp16 sections"
    )
    eval_every: int = Field(
        100, ge=0, description="evaluate every N optimizer steps; 0 = only at the end"
    )
    eval_batch_size: int = Field(64, gt=0, description="examples per rank per eval batch")
    eval_generate: int = Field(
        0,
        ge=0,
        description="decoders: at each evaluation both models greedily complete the prompts of "
        "the first N held-out examples (exact match, word F1; generations/step<k>.jsonl); "
        "0 = off",
    )
    eval_max_new_tokens: int = Field(
        32, gt=0, description="the most tokens a completion of eval_generate may have"
    )
    best_metric: NonEmptyStr | None = Field(
        None,
        description="the student metric that picks the best evaluation (summary best_student, "
        "the compare tables), e.g. accuracy, f1, perplexity, exact_match (with eval_generate); "
        "null = the task's primary metric",
    )
    log_every: int = Field(10, gt=0, description="log metrics every N optimizer steps")
    max_skipped_steps: int = Field(
        10,
        ge=0,
        description="stop the run (summary marked failed) after this many optimizer steps in a "
        "row skipped for a non-finite loss, gradient or influence (fp16 overflows count too); "
        "0 = never stop",
    )


def _string_keys(d: dict, key: str) -> None:
    for k, v in d.items():
        if not isinstance(k, str):
            raise ConfigError(f"{key} must have string keys, got {k!r}")
        if isinstance(v, dict):
            _string_keys(v, f"{key}.{k}")


class DeepSpeedSection(Section):
    config: NonEmptyStr | None = Field(
        None,
        description="DeepSpeed JSON (the --ds_config flag sets it); null = built-in ZeRO-2 "
        "(= ds_configs/zero2.json)",
    )
    teacher: dict = Field(
        default_factory=dict,
        description="deep-merged into the teacher's DeepSpeed dict, e.g. "
        "{zero_optimization: {stage: 3}}",
    )
    student: dict = Field(
        default_factory=dict, description="deep-merged into the student's DeepSpeed dict"
    )

    @field_validator("teacher", "student")
    @classmethod
    def _own_copy(cls, value: dict, info: ValidationInfo) -> dict:
        _string_keys(value, f"deepspeed.{info.field_name}")
        return copy.deepcopy(value)


class OutputConfig(Section):
    dir: NonEmptyStr = Field(
        "outputs/lgtm-default", description="run folder: resolved config, metrics, checkpoints"
    )
    overwrite: bool = Field(False, description="allow reusing a non-empty run folder")
    save_teacher: bool = Field(True, description="also save the co-trained teacher at the end")
    checkpoint_every: int = Field(
        0, ge=0, description="optimizer steps between checkpoints; 0 = none"
    )
    keep_checkpoints: int | None = Field(
        None, gt=0, description="keep only the newest K checkpoints; null = all"
    )
    resume: NonEmptyStr | None = Field(
        None,
        description='checkpoint folder, or "auto" = the latest under dir/checkpoints, or a '
        "fresh start when there is none yet (one command both starts and continues a job)",
    )
    influence_log: bool = Field(
        True,
        description="lgtm only: write influence.jsonl, one row per step and training example: "
        "its index in the training data, its influence, each model's gold-label probability "
        "(decoders: mean token CE)",
    )
    influence_log_examples: int | None = Field(
        None,
        gt=0,
        description="track only this many training examples (a seeded random choice) in "
        "influence.jsonl; null = all",
    )
    influence_log_max_rows: int = Field(
        1_000_000,
        gt=0,
        description="stop appending to influence.jsonl after this many rows (~100 bytes each)",
    )
    wandb: bool = Field(False, description="log to Weights & Biases")
    wandb_project: NonEmptyStr = Field("lgtm-ds", description="W&B project name")
    run_name: str | None = Field(
        None, description="W&B run name; null = the name of the output.dir folder"
    )


class ExperimentConfig(_Model):
    """The whole experiment. Sections may be given as mappings; once the tree is built, the
    method's own ``check_config`` runs (e.g. lgtm refuses train.precision=fp16)."""

    model: ModelConfig = Field(
        default_factory=ModelConfig, description="teacher, student, tokenizer"
    )
    data: DataConfig = Field(
        default_factory=DataConfig, description="dataset, tokenization, quiz set"
    )
    method: MethodConfig = Field(
        default_factory=MethodConfig, description="distillation method and its loss weights"
    )
    train: TrainConfig = Field(
        default_factory=TrainConfig,
        description="batch sizes, learning rates, schedule, precision, evaluation",
    )
    deepspeed: DeepSpeedSection = Field(
        default_factory=DeepSpeedSection,
        description="DeepSpeed JSON and per-role overrides",
    )
    output: OutputConfig = Field(
        default_factory=OutputConfig, description="run folder, checkpoints, logging"
    )

    @field_validator("*", mode="before")
    @classmethod
    def _empty_section(cls, value: Any) -> Any:
        return {} if value is None else value  # "train:" with nothing under it

    @model_validator(mode="after")
    def _method_checks(self) -> ExperimentConfig:
        from ..methods import get_method

        get_method(self.method.name).check_config(self)  # the method's own ConfigErrors
        m = self.method
        if m.hidden_weight > 0 and m.hidden_positions == "first":
            if self.data.task_type == "causal_lm":
                raise ConfigError(
                    "method.hidden_positions=first compares the first token ([CLS]) of "
                    "classifiers; a decoder's first token is its BOS: use all"
                )
        return self


SECTIONS: dict[str, type[Section]] = {
    name: f.annotation for name, f in ExperimentConfig.model_fields.items()
}
