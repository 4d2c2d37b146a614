"""Every method x seed on one experiment, everything else equal; tables and learning curves.

    python launch/compare.py --config my.yaml --methods vanilla_kd,online_kd,metadistil,lgtm \
        --seeds 3 [--out compare] [--launcher "deepspeed --num_gpus 8"] [--section.key=value ...]

The logic lives in ``lgtm_ds/tools/compare.py`` (``--help`` describes the outputs).
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "kernels")]  # runs from a plain checkout too

from lgtm_ds.tools.compare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
