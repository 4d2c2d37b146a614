"""LGTM-DS: LGTM knowledge distillation at large-model scale on DeepSpeed.

The public API is imported lazily, so ``import lgtm_ds`` imports nothing heavy.
``lgtm_ds.config`` imports the method and task registries (and so torch): the methods' options
are part of the experiment. DeepSpeed is imported only by the engines that run it.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import ConfigError, DataError, LGTMError, ModelError

_LAZY = {
    "Distiller": "lgtm_ds.methods",
    "get_method": "lgtm_ds.methods",
    "method_names": "lgtm_ds.methods",
    "get_task": "lgtm_ds.tasks",
    "task_names": "lgtm_ds.tasks",
    "Engine": "lgtm_ds.engines",
    "TorchEngine": "lgtm_ds.engines",
}

__all__ = ["LGTMError", "ConfigError", "DataError", "ModelError", *_LAZY]
__version__ = "0.10.0"  # the one place the version is set (pyproject.toml reads it)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lgtm_ds' has no attribute {name!r}")
