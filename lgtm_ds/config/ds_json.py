"""The DeepSpeed JSON rules: one DeepSpeed config dict per role (teacher / student).

The experiment owns batch sizes, accumulation, clipping and precision; the DeepSpeed JSON says
``"auto"`` for them (or the same value), and per-role overrides from the experiment
(``deepspeed.teacher`` / ``deepspeed.student``) are deep-merged on top.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from .schema import ExperimentConfig


def deep_merge(base: dict, over: dict) -> dict:
    """New dict: ``over`` wins; nested dicts merged recursively."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


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

    ds = deep_merge(base, role_over)
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
