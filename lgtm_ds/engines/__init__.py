"""Engines: one model + its optimizer, schedule, clipping and accumulation, per role.

- ``base``: the :class:`Engine` interface the methods talk to, and :class:`TorchEngine` (plain
  modules: notebooks, CPU tests, the float64 oracles).
- ``deepspeed``: the DeepSpeed adapter and process-group helpers, the only module that touches
  DeepSpeed internals (imported lazily: ``import lgtm_ds.engines`` does not import DeepSpeed).
- ``optim``: the client AdamW (decay / no-decay groups) and the warmup-linear schedule.
- ``build``: both roles' DeepSpeed dicts and engines, built in one place.
"""

from .base import AdamState, Engine, TorchEngine, adam_state_from_torch, get_logits, model_inputs

__all__ = [
    "AdamState",
    "Engine",
    "TorchEngine",
    "adam_state_from_torch",
    "get_logits",
    "model_inputs",
]
