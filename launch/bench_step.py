"""ms/step and peak memory of every method and the naive LGTM form, same models, same run.

    python launch/bench_step.py                      # CPU-sized embedded BERTs
    python launch/bench_step.py --preset bert-base   # BERT-base -> 6-layer BERT (GPU)

The logic lives in ``lgtm_ds/tools/bench_step.py`` (``--help`` lists the flags).
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "kernels")]  # runs from a plain checkout too

from lgtm_ds.tools.bench_step import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
