"""Typed experiment configuration.

The YAML experiment file is a skin over this tree of dataclasses; ``--section.key=value`` on the
command line overrides it. The experiment owns batch sizes, accumulation, learning rates, the
schedule and the precision; the DeepSpeed JSON says ``"auto"`` for those.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
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


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | glue | files
    task: str | None = None  # GLUE task name when source == "glue"
    train_file: str | None = None  # csv / json / jsonl / parquet when source == "files"
    validation_file: str | None = None
    text_columns: list[str] = field(default_factory=lambda: ["text"])  # one column, or two (pairs)
    label_column: str = "label"
    max_length: int = 128
    # Where the held-out quiz batches come from: "train" carves quiz_fraction of the training data
    # (seeded, indices recorded in the outputs); "validation" uses the dev set (explicit choice).
    quiz_source: str = "train"
    quiz_fraction: float = 0.1
    synthetic_examples: int = 3000
    synthetic_label_noise: float = 0.1
    max_train_examples: int | None = None
    max_eval_examples: int | None = None


@dataclass
class MethodConfig:
    name: str = "lgtm"  # lgtm | online_kd | vanilla_kd
    alpha_student: float = 1.0  # weight of the KD term in the student loss (rest is CE)
    alpha_teacher: float = 0.4  # weight of the KD term in the teacher loss (rest is its own CE)
    temperature: float = 1.0
    fd_radius: float = 1e-2  # finite-difference radius r; R = r / ||v||
    scale_by_t2: bool = False  # multiply KD terms by T^2 (the reference does not)
    teacher_stage1_epochs: float = 1.0  # vanilla_kd: epochs of teacher fine-tuning before stage 2


@dataclass
class TrainConfig:
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


@dataclass
class DeepSpeedSection:
    config: str | None = None  # DeepSpeed JSON path (the --ds_config flag sets it)
    # Deep-merged into the role's dict, e.g. {"zero_optimization": {"stage": 3}} for the teacher.
    teacher: dict = field(default_factory=dict)
    student: dict = field(default_factory=dict)


@dataclass
class OutputConfig:
    dir: str = "outputs/lgtm-default"
    overwrite: bool = False
    save_teacher: bool = True
    checkpoint_every: int = 0  # optimizer steps; 0 = no intermediate checkpoints
    resume: str | None = None  # checkpoint folder, or "auto" = latest under dir/checkpoints
    wandb: bool = False
    wandb_project: str = "lgtm-ds"
    run_name: str | None = None


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    output: OutputConfig = field(default_factory=OutputConfig)
