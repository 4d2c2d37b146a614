"""Benchmark lgtm_kernels against torch eager, torch.compile and Liger-Kernel on one CUDA card.

    python launch/bench_kernels.py [--check] [--quick] [--out benchmarks/kernels.csv]
    LGTM_BENCH_DRYRUN=1 python launch/bench_kernels.py --quick --out /tmp/x.csv   # CPU smoke run

The logic (cases, CSV columns, ``--only kd|perturb``) lives in ``lgtm_ds/tools/bench_kernels.py``
(``--help`` lists the flags).
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "kernels")]  # runs from a plain checkout too

from lgtm_ds.tools.bench_kernels import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
