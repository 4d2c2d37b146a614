"""``python -m lgtm_ds.config``: print the default experiment (every key, its default and its
meaning), i.e. ``configs/default.yaml``; with ``--markdown``, ``docs/configuration.md``."""

import sys

from . import dump_configuration_md, dump_default_yaml

print(dump_configuration_md() if "--markdown" in sys.argv[1:] else dump_default_yaml(), end="")
