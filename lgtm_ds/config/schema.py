"""The typed experiment tree: six frozen sections under :class:`ExperimentConfig`.

Each field's default is THE default (``configs/default.yaml`` and ``docs/configuration.md`` are
generated from them), its ``description`` documents it, its constraints validate it; bad input
is one ``ConfigError`` naming the dotted key (:mod:`lgtm_ds.options`). The ``method`` section is
collected from the method registry (:mod:`lgtm_ds.methods.config`): the keys every method
shares, and one nested section per method with hyper-parameters of its own, defined beside it.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from ..engines.head import FUSED_HEAD_DEFAULT
from ..errors import ConfigError
from ..methods import METHODS, get_method
from ..methods.config import MethodSection, method_config_class
from ..methods.onpolicy import check_onpolicy_config
from ..options import NonEmptyStr, Options
from ..tasks import get_task
from ..tasks.adapters import AdapterOptions

_CHUNK_DOC = (
    "token rows per chunk of the fused head; null = 2^21 logits per chunk (64 rows at a 32000 "
    "vocabulary, 16 at 128256)"
)


class ModelConfig(Options):
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
        FUSED_HEAD_DEFAULT,
        description="decoders (causal_lm): every loss, the LGTM teacher gradient and evaluation "
        "from the models' last hidden states through their output layers, chunk by chunk of "
        "tokens (lgtm_kernels fused-linear ops), never the full [tokens, vocab] logits; false = "
        "full logits. Every method and ZeRO stage; not for a model whose logits are not its "
        "output layer on its decoder's states (soft-capped, scaled): full logits there",
    )
    fused_head_chunk: int | None = Field(None, ge=1, description=_CHUNK_DOC)
    zero_init_classifier: bool = Field(
        False,
        description="zero both classification heads, as the LGTM reference does for pre-trained "
        "BERTs; the embedded models start from random weights, where a zero head stalls learning",
    )
    teacher_peft: AdapterOptions = Field(
        default_factory=AdapterOptions,
        description="LoRA adapters on the teacher (docs/adapters.md): the base frozen, the "
        "adapters trained by every method",
    )
    student_peft: AdapterOptions = Field(
        default_factory=AdapterOptions, description="LoRA adapters on the student"
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

    @field_validator("teacher_peft", "student_peft", mode="before")
    @classmethod
    def _empty_peft(cls, value: Any) -> Any:
        return {} if value is None else value  # "teacher_peft:" with nothing under it

    @model_validator(mode="after")
    def _adapters(self) -> ModelConfig:
        self.teacher_peft.check("model.teacher_peft")
        self.student_peft.check("model.student_peft")
        return self


class DataConfig(Options):
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
        task = get_task(self.task_type) if self.task_type else None
        if task is None:
            return self
        t = self.task_type
        if task.reads == "text" and self.source == "glue":
            raise ConfigError(
                f"data.source='glue' has no {t} form (data.task_type {t!r} reads text); use "
                "synthetic, files or hub"
            )
        if (
            task.reads == "text"
            and self.source == "synthetic"
            and self.format not in ("auto", "prompt_completion")
        ):
            raise ConfigError(
                f"data.format={self.format!r}: the synthetic instruction task (data.source "
                f"'synthetic', data.task_type {t!r}) is prompt_completion; use auto or "
                "prompt_completion"
            )
        if self.format != "auto" and task.reads != "text":
            raise ConfigError(
                f"data.format={self.format!r} applies to task types that read text (e.g. "
                f"causal_lm) only, got data.task_type={t!r}"
            )
        return self


class TrainConfig(Options):
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
    loss_spike_factor: float = Field(
        10.0,
        ge=0,
        description="stop the run (summary marked diverged) when a model's loss stays above this "
        "many times its reference (the lowest running median of 5 steps so far, at least "
        "loss_spike_floor) for loss_spike_steps steps in a row: a divergence that stays finite; "
        "0 = off",
    )
    loss_spike_steps: int = Field(
        5, gt=0, description="optimizer steps in a row above the bound that stop the run"
    )
    loss_spike_warmup: int = Field(
        20,
        ge=0,
        description="the first N steps of each loss are not judged (they still set its reference)",
    )
    loss_spike_floor: float = Field(
        1.0,
        gt=0,
        description="the smallest reference: a loss near 0 (e.g. the KL of two alike models) "
        "rising a little is not a divergence",
    )


def _string_keys(d: dict, key: str) -> None:
    for k, v in d.items():
        if not isinstance(k, str):
            raise ConfigError(f"{key} must have string keys, got {k!r}")
        if isinstance(v, dict):
            _string_keys(v, f"{key}.{k}")


class DeepSpeedSection(Options):
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


class OutputConfig(Options):
    dir: NonEmptyStr = Field(
        "outputs/lgtm-default", description="run folder: resolved config, metrics, checkpoints"
    )
    overwrite: bool = Field(False, description="allow reusing a non-empty run folder")
    save_teacher: bool = Field(True, description="also save the co-trained teacher at the end")
    merge_adapters: bool = Field(
        False,
        description="a role with LoRA adapters (model.*_peft) is saved as its adapter folder "
        "(peft); true = as the merged model (base + adapters, loads with plain transformers), "
        "the adapter folder in its adapter/",
    )
    checkpoint_every: int = Field(
        0, ge=0, description="optimizer steps between checkpoints; 0 = none"
    )
    keep_checkpoints: int | None = Field(
        3,
        gt=0,
        description="keep only the newest K checkpoints (more than one: resume=auto falls back "
        "to an older one when the newest is damaged); null = all",
    )
    checkpoint_on_signal: bool = Field(
        False,
        description="on SIGINT / SIGTERM, finish the current optimizer step and save a "
        "checkpoint before stopping (within 60 s; more than one rank: one small all-gather "
        "per step); false = stop at once, from the newest checkpoint",
    )
    resume: NonEmptyStr | None = Field(
        None,
        description='checkpoint folder, or "auto" = the newest complete checkpoint under '
        "dir/checkpoints (damaged ones skipped with a warning), or a fresh start when there is "
        "none yet (one command both starts and continues a job)",
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


MethodConfig = method_config_class()  # the section for the methods registered at import


class ExperimentConfig(Options):
    """The whole experiment. Sections may be given as mappings; once the tree is built, the
    method's own ``check_config`` runs (e.g. lgtm refuses train.precision=fp16)."""

    model: ModelConfig = Field(
        default_factory=ModelConfig, description="teacher, student, tokenizer"
    )
    data: DataConfig = Field(
        default_factory=DataConfig, description="dataset, tokenization, quiz set"
    )
    method: MethodConfig = Field(
        default_factory=MethodConfig,
        description="distillation method: the loss weights every method shares, and each "
        "method's own hyper-parameters in its section (method.<name>.*)",
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

    @field_validator("method", mode="before")
    @classmethod
    def _method_section(cls, value: Any) -> Any:
        # a section built before the registry changed: validated again by the current class
        if isinstance(value, MethodSection) and type(value) is not method_config_class():
            return value.model_dump()
        return value

    @model_validator(mode="after")
    def _method_checks(self) -> ExperimentConfig:
        get_method(self.method.name).check_config(self)  # the method's own ConfigErrors
        check_onpolicy_config(self)
        m, t = self.method, self.data.task_type
        if m.hidden_weight > 0 and m.hidden_positions == "first":
            if t is not None and not get_task(t).first_token_summarises:
                raise ConfigError(
                    "method.hidden_positions=first compares the first token ([CLS]) of "
                    f"classifiers; the first token of data.task_type {t!r} does not summarise "
                    "the sequence (a decoder's is its BOS): use all"
                )
        return self

    @model_validator(mode="after")
    def _merge_needs_adapters(self) -> ExperimentConfig:
        m = self.model
        if self.output.merge_adapters and not (m.teacher_peft.enabled or m.student_peft.enabled):
            raise ConfigError(
                "output.merge_adapters is set but neither model.teacher_peft.enabled nor "
                "model.student_peft.enabled is: there are no adapters to merge"
            )
        return self


SECTIONS: dict[str, type[Options]] = {
    name: f.annotation for name, f in ExperimentConfig.model_fields.items()
}
for _name, _section in SECTIONS.items():
    _section.key = _name


def _methods_changed() -> None:
    """A method was registered or removed: the ``method`` section follows the registry."""
    global MethodConfig
    MethodConfig = method_config_class()
    field = ExperimentConfig.model_fields["method"]
    field.annotation, field.default_factory = MethodConfig, MethodConfig
    ExperimentConfig.model_rebuild(force=True)
    SECTIONS["method"] = MethodConfig


METHODS.on_change(_methods_changed)
