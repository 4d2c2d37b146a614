"""LGTM-DS: LGTM knowledge distillation at large-model scale on DeepSpeed."""

from .algorithm import METHODS, Distiller
from .engines import Engine, TorchEngine
from .errors import ConfigError, DataError, LGTMError, ModelError

__all__ = [
    "Distiller",
    "Engine",
    "TorchEngine",
    "METHODS",
    "LGTMError",
    "ConfigError",
    "DataError",
    "ModelError",
]
__version__ = "0.1.0"
