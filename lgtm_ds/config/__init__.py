"""Typed experiment configuration.

An experiment is a tree of six sections (``model``, ``data``, ``method``, ``train``,
``deepspeed``, ``output``), each a frozen pydantic model in :mod:`.schema`. The schema is the one
source of defaults and of their documentation: ``configs/default.yaml`` and
``docs/configuration.md`` are generated from it (``python -m lgtm_ds.config [--markdown]``) and
a test keeps them equal. The ``method`` section is collected from the method registry: the keys
every method shares, and each method's own options (``method.<name>.*``, :mod:`lgtm_ds.methods.
config`).

Flow (:mod:`.loading`):

1. ``parse_args`` (argparse) takes ``--config``, ``--ds_config``, ``--local_rank``, ``-h``; every
   other flag is a ``--section.key=value`` override.
2. ``load_config`` reads the YAML into a plain dict and sets each override in it, in order
   (later wins; deep keys reach into the dict fields: ``deepspeed.teacher.zero_optimization.
   stage=3``).
3. The merged dict is validated once: pydantic converts and checks every value against the
   field's type and constraints (strings from the command line included), the cross-field
   checks run, ``method.name`` is looked up in the method registry and that method's
   ``check_config`` runs. Any failure is ONE ``ConfigError`` naming the dotted key, the value
   and the rule (never a pydantic dump). Nothing is modified after construction.
4. ``build_ds_config`` (:mod:`.ds_json`) turns the experiment into one DeepSpeed dict per role
   (teacher / student): the experiment owns batch sizes, accumulation, clipping and precision;
   the DeepSpeed JSON says ``"auto"`` for them.

``config_to_dict`` / ``save_resolved`` write the resolved experiment back out.
"""

from .ds_json import DEFAULT_DS_CONFIG, build_ds_config, deep_merge
from .loading import (
    config_to_dict,
    dump_configuration_md,
    dump_default_yaml,
    load_config,
    parse_args,
    save_resolved,
)
from .schema import (
    DataConfig,
    DeepSpeedSection,
    ExperimentConfig,
    MethodConfig,
    ModelConfig,
    OutputConfig,
    TrainConfig,
)

__all__ = [
    "DEFAULT_DS_CONFIG",
    "DataConfig",
    "DeepSpeedSection",
    "ExperimentConfig",
    "MethodConfig",
    "ModelConfig",
    "OutputConfig",
    "TrainConfig",
    "build_ds_config",
    "config_to_dict",
    "deep_merge",
    "dump_configuration_md",
    "dump_default_yaml",
    "load_config",
    "parse_args",
    "save_resolved",
]
