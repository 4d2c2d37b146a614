"""Peak memory of a step with LoRA adapters against a frozen teacher, same run.

    python launch/bench_memory.py                      # 50M -> 0.20M decoders, fp32, CPU
    python launch/bench_memory.py --engine deepspeed   # the same on DeepSpeed engines

The logic lives in ``lgtm_ds/tools/bench_memory.py`` (``--help`` lists the flags).
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "kernels")]  # runs from a plain checkout too

from lgtm_ds.tools.bench_memory import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
