"""``python -m lgtm_ds.config``: print the default experiment (every key, its default and its
meaning), i.e. ``configs/default.yaml``."""

from . import dump_default_yaml

print(dump_default_yaml(), end="")
