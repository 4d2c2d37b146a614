"""bf16 vs float64: cosine of the LGTM influence term and of the per-sample influence.

    python launch/influence_precision.py [--steps 3] [--batch 32] [--warm_steps 100]

The logic lives in ``lgtm_ds/tools/influence_precision.py``.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "kernels")]  # runs from a plain checkout too

from lgtm_ds.tools.influence_precision import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
