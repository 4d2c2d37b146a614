"""``launch/train.py`` whose job dies at the start of its ``CRASH_AT``-th training step on
every rank (``os._exit``: no cleanup, as a killed job), for the 2-rank resume test in
``tests/integration/test_onpolicy.py``.

    deepspeed --num_gpus 2 tests/onpolicy_crash_worker.py [train.py arguments]
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "kernels")]

from lgtm_ds.methods.distiller import Distiller  # noqa: E402
from lgtm_ds.training.cli import main  # noqa: E402

CRASH_AT = int(os.environ["CRASH_AT"])
_step, _calls = Distiller.step, [0]


def step(self, *args, **kwargs):
    _calls[0] += 1
    if _calls[0] >= CRASH_AT:
        os._exit(3)
    return _step(self, *args, **kwargs)


Distiller.step = step

if __name__ == "__main__":
    sys.exit(main())
