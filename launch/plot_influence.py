"""Plots of an LGTM run's distillation influence (influence.jsonl): Fig. 3/4-style and more.

    python launch/plot_influence.py RUN_DIR [--out DIR] [--examples 12,345] [--trend 64]

The logic lives in ``lgtm_ds/tools/plot_influence.py`` (``--help`` describes the outputs).
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "kernels")]  # runs from a plain checkout too

from lgtm_ds.tools.plot_influence import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
