"""The teacher's and the student's engines, built in one place.

DeepSpeed-Chat's shape (``rlhf_engine.py``): one DeepSpeed config dict and one
``deepspeed.initialize`` per role. The dicts come from the experiment's JSON rules
(``lgtm_ds.config.build_ds_config``) and then the method's own requirements
(``Method.prepare_ds_configs``, e.g. fp32 teacher gradients for bf16 LGTM); both are resolved
before anything is written, so a bad combination fails with one clear error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ..config import build_ds_config
from ..methods import get_method
from .base import Engine, TorchEngine
from .optim import build_adamw, warmup_linear

if TYPE_CHECKING:
    from ..config import ExperimentConfig


def resolve_ds_configs(cfg: ExperimentConfig, world_size: int) -> tuple[dict, dict]:
    """``(teacher_dict, student_dict)``: JSON + role overrides + experiment-owned values, then
    the method's checks and adjustments. Raises ConfigError naming the key at fault."""
    teacher = build_ds_config(cfg, "teacher", world_size)
    student = build_ds_config(cfg, "student", world_size)
    get_method(cfg.method.name).prepare_ds_configs(cfg, teacher, student)
    return teacher, student


def build_engines(
    cfg: ExperimentConfig,
    teacher: nn.Module,
    student: nn.Module,
    *,
    teacher_steps: int,
    student_steps: int,
    ds_configs: tuple[dict, dict] | None = None,
) -> tuple[Engine, Engine]:
    """Both engines, each with a client ``torch.optim.AdamW`` (decay / no-decay groups) and a
    warmup-linear schedule over its own number of optimizer steps. A role with 0 steps (the
    teacher of vanilla KD without its fine-tuning stage, or of ``student_only``) is frozen: no
    optimizer, so no fp32 master copy, no optimizer state and no gradient partitions of it exist
    (:func:`~lgtm_ds.engines.deepspeed.build_frozen_engine`).

    ``ds_configs``: the two roles' DeepSpeed dicts (:func:`resolve_ds_configs`) -> DeepSpeed
    engines; None -> :class:`TorchEngine` s (plain modules: the same optimizer, schedule,
    accumulation and clipping, no DeepSpeed; benchmarks and notebooks)."""
    t = cfg.train
    engines = []
    for i, (role, model, lr, steps) in enumerate(
        (
            ("teacher", teacher, t.teacher_lr, teacher_steps),
            ("student", student, t.student_lr, student_steps),
        )
    ):
        if steps == 0 and ds_configs is not None:
            from .deepspeed import build_frozen_engine

            engines.append(build_frozen_engine(model, ds_configs[i], role))
            continue
        if steps == 0:  # plain module, nothing to step
            engines.append(TorchEngine(model, None))
            continue
        opt = build_adamw(model, lr, t.weight_decay)
        sched = warmup_linear(opt, max(steps, 1), t.warmup_ratio)
        if ds_configs is None:
            engines.append(
                TorchEngine(
                    model,
                    opt,
                    sched,
                    gradient_accumulation_steps=t.gradient_accumulation_steps,
                    max_grad_norm=t.max_grad_norm,
                )
            )
        else:
            from .deepspeed import build_engine

            engines.append(build_engine(model, opt, sched, ds_configs[i], role))
    return engines[0], engines[1]
