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

PRIVATE: tuple[Private, ...] = (
    # the engine: the client optimizer under DeepSpeed's wrapper
    Private(_ENGINE, "DeepSpeedEngine", "basic_optimizer", "assigned", "zero_state, deepspeed"),
    # ZeRO-1/2: the flat fp32 partitions and their process groups
    Private(_ZERO12, "DeepSpeedZeroOptimizer", "bit16_groups", "assigned", "zero_state"),
    Private(_ZERO12, "DeepSpeedZeroOptimizer", "bit16_groups_flat", "assigned", "zero_state"),
    Private(
        _ZERO12,
        "DeepSpeedZeroOptimizer",
        "single_partition_of_fp32_groups",
        "assigned",
        "zero_state",
    ),
    Private(_ZERO12, "DeepSpeedZeroOptimizer", "real_dp_process_group", "assigned", "zero_state"),
    # ZeRO-1/2 and bf16: each parameter's fragment of the fp32 state
    Private(_LINK, None, "lazy_init_hp_params_optimizer_state", "member", "zero_state"),
    Private(_LINK, None, "_hp_mapping", "assigned", "zero_state (param._hp_mapping)"),
    Private(_LINK, None, "_index_in_param_group", "assigned", "zero_state (add_grads_)"),
    Private(_FRAGMENT, "tensor_fragment", "get_hp_fragment", "member", "zero_state"),
    Private(_FRAGMENT, "tensor_fragment", "get_hp_fragment_address", "member", "zero_state"),
    Private(_FRAGMENT, "tensor_fragment", "get_optim_state_fragment", "member", "zero_state"),
    Private(_FRAGMENT, "tensor_fragment", "get_lp_grad_fragment", "member", "zero_state"),
    Private(_FRAGMENT, "tensor_fragment", "lp_fragment_address", "field", "zero_state"),
    # bf16 optimizer (ZeRO-0/1 bf16)
    Private(_BF16, "BF16_Optimizer", "bf16_groups", "assigned", "zero_state"),
    Private(_BF16, "BF16_Optimizer", "fp32_groups_flat_partition", "assigned", "zero_state"),
    # ZeRO-0 fp16/bf16: FP16_Optimizer's masters
    Private(_FP16, "FP16_Optimizer", "fp16_groups", "assigned", "zero_state"),
    Private(_FP16, "FP16_Optimizer", "fp32_groups_flat", "assigned", "zero_state"),
    Private(_FP16_UNFUSED, "FP16_UnfusedOptimizer", "fp32_groups", "assigned", "zero_state"),
    # ZeRO-3: the partitioned parameters
    Private(_ZERO3, "DeepSpeedZeroOptimizer_Stage3", "fp16_groups", "assigned", "zero_state"),
    Private(_ZERO3, "DeepSpeedZeroOptimizer_Stage3", "parameter_offload", "assigned", "zero3"),
    Private(_PARAMS, None, "ds_tensor", "assigned", "zero_state, zero3 (param.ds_tensor)"),
    Private(_PARAMS, None, "ds_numel", "assigned", "zero_state, zero3 (param.ds_numel)"),
    Private(_PARAMS, None, "ds_shape", "assigned", "zero3 (param.ds_shape)"),
    Private(_PARAMS, None, "ds_process_group", "assigned", "zero_state, zero3"),
    # ZeRO-3: the module hooks the influence passes take off and put back
    Private(_OFFLOAD, None, "FWD_MODULE_STACK", "member", "zero3 (hooks_off)"),
    Private(_OFFLOAD, "DeepSpeedZeRoOffload", "_remove_module_hooks", "member", "zero3"),
    Private(_OFFLOAD, "DeepSpeedZeRoOffload", "setup_zero_stage3_hooks", "member", "zero3"),
    Private(_OFFLOAD, "DeepSpeedZeRoOffload", "empty_partition_cache", "member", "zero3"),
    Private(_OFFLOAD, "DeepSpeedZeRoOffload", "get_param_coordinator", "member", "zero3"),
    Private(_OFFLOAD, "DeepSpeedZeRoOffload", "forward_hooks", "assigned", "zero3"),
    Private(_OFFLOAD, "DeepSpeedZeRoOffload", "backward_hooks", "assigned", "zero3"),
)


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
