"""Every DeepSpeed internal that LGTM-DS reads or calls, in one list, and a check that the
installed DeepSpeed still has each of them (``tests/unit/test_ds_private.py`` runs it: on a
DeepSpeed release that moved one, the test fails naming it, before any influence pass reads a
missing attribute in the middle of a run).

pyproject.toml pins ``deepspeed>=0.19,<0.20`` for this reason. What the public API offers
(``deepspeed.initialize``, ``deepspeed.comm``, ``deepspeed.zero.GatheredParameters``,
``safe_get_*`` / ``safe_set_*`` in ``deepspeed.utils``, the engine's documented methods) is not
listed.

An entry is ``(module, owner, name, kind, used by)``: ``owner`` a class in ``module`` (None:
the module itself); ``kind`` ``"member"`` (a method, class attribute or module-level name:
``hasattr``), ``"field"`` (a dataclass field of the owner) or ``"assigned"`` (an instance
attribute DeepSpeed sets at run time: the owner's source must assign ``.<name> =``).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from typing import NamedTuple


class Private(NamedTuple):
    module: str
    owner: str | None
    name: str
    kind: str  # "member" | "assigned" | "field"
    used_by: str


_ENGINE = "deepspeed.runtime.engine"
_ZERO12 = "deepspeed.runtime.zero.stage_1_and_2"
_ZERO3 = "deepspeed.runtime.zero.stage3"
_OFFLOAD = "deepspeed.runtime.zero.parameter_offload"
_PARAMS = "deepspeed.runtime.zero.partition_parameters"
_BF16 = "deepspeed.runtime.bf16_optimizer"
_FP16 = "deepspeed.runtime.fp16.fused_optimizer"
_FP16_UNFUSED = "deepspeed.runtime.fp16.unfused_optimizer"
_LINK = "deepspeed.utils.mixed_precision_linkage"
_FRAGMENT = "deepspeed.utils.tensor_fragment"


def _group(module: str, owner: str | None, kind: str, used_by: str, *names: str):
    return tuple(Private(module, owner, name, kind, used_by) for name in names)


_ZERO_OPT, _OFFLOADER = "DeepSpeedZeroOptimizer", "DeepSpeedZeRoOffload"
PRIVATE: tuple[Private, ...] = (
    # the engine: the client optimizer under DeepSpeed's wrapper
    *_group(_ENGINE, "DeepSpeedEngine", "assigned", "zero_state, deepspeed", "basic_optimizer"),
    # ZeRO-1/2: the flat fp32 partitions and their process groups
    *_group(_ZERO12, _ZERO_OPT, "assigned", "zero_state", "bit16_groups", "bit16_groups_flat"),
    *_group(_ZERO12, _ZERO_OPT, "assigned", "zero_state", "single_partition_of_fp32_groups"),
    *_group(_ZERO12, _ZERO_OPT, "assigned", "zero_state", "real_dp_process_group"),
    # ZeRO-1/2 and bf16: each parameter's fragment of the fp32 state (param._hp_mapping)
    *_group(_LINK, None, "member", "zero_state", "lazy_init_hp_params_optimizer_state"),
    *_group(_LINK, None, "assigned", "zero_state", "_hp_mapping", "_index_in_param_group"),
    *_group(_FRAGMENT, "tensor_fragment", "member", "zero_state", "get_hp_fragment",
            "get_hp_fragment_address", "get_optim_state_fragment", "get_lp_grad_fragment"),
    *_group(_FRAGMENT, "tensor_fragment", "field", "zero_state", "lp_fragment_address"),
    # the bf16 optimizer (ZeRO-0/1 bf16) and FP16_Optimizer (ZeRO-0 fp16/bf16): the masters
    *_group(_BF16, "BF16_Optimizer", "assigned", "zero_state", "bf16_groups",
            "fp32_groups_flat_partition"),
    *_group(_FP16, "FP16_Optimizer", "assigned", "zero_state", "fp16_groups", "fp32_groups_flat"),
    *_group(_FP16_UNFUSED, "FP16_UnfusedOptimizer", "assigned", "zero_state", "fp32_groups"),
    # ZeRO-3: the optimizer and the partitioned parameters (param.ds_tensor, ...)
    *_group(_ZERO3, "DeepSpeedZeroOptimizer_Stage3", "assigned", "zero_state", "fp16_groups"),
    *_group(_ZERO3, "DeepSpeedZeroOptimizer_Stage3", "assigned", "zero3", "parameter_offload"),
    *_group(_PARAMS, None, "assigned", "zero_state, zero3", "ds_tensor", "ds_numel", "ds_shape",
            "ds_process_group"),
    # ZeRO-3: the module hooks the influence passes take off and put back (hooks_off)
    *_group(_OFFLOAD, None, "member", "zero3", "FWD_MODULE_STACK"),
    *_group(_OFFLOAD, _OFFLOADER, "member", "zero3", "_remove_module_hooks",
            "setup_zero_stage3_hooks", "empty_partition_cache", "get_param_coordinator"),
    *_group(_OFFLOAD, _OFFLOADER, "assigned", "zero3", "forward_hooks", "backward_hooks"),
)  # fmt: skip


def missing() -> list[str]:
    """One line per entry the installed DeepSpeed lacks (empty: all present)."""
    import deepspeed

    out = []
    for p in PRIVATE:
        where = f"{p.module}{'.' + p.owner if p.owner else ''}"
        try:
            obj = importlib.import_module(p.module)
            if p.owner is not None:
                obj = getattr(obj, p.owner)
        except (ImportError, AttributeError) as e:
            out.append(f"{where} is gone ({type(e).__name__}: {e}); used by {p.used_by}")
            continue
        if p.kind == "member":
            ok = hasattr(obj, p.name)
        elif p.kind == "field":
            ok = p.name in {f.name for f in dataclasses.fields(obj)}
        else:
            ok = re.search(rf"\.{re.escape(p.name)}\s*(:[^=\n]*)?=[^=]", inspect.getsource(obj))
        if not ok:
            out.append(
                f"DeepSpeed {deepspeed.__version__}: {where} no longer "
                f"{'has' if p.kind == 'member' else 'sets'} {p.name!r}; used by {p.used_by}"
            )
    return out
