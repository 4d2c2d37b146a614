"""Train teacher and student with LGTM (or a baseline) on two DeepSpeed engines.

    deepspeed launch/train.py --ds_config ds_configs/zero2.json [--config exp.yaml] [--a.b=c ...]

With no argument: the embedded default experiment (``python -m lgtm_ds.config`` prints it).
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "kernels")]  # runs from a plain checkout too

from lgtm_ds.training.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
