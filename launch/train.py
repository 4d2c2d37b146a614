"""Train teacher and student with LGTM (or a baseline) on two DeepSpeed engines.

deepspeed launch/train.py --ds_config ds_configs/zero2.json [--config exp.yaml] [--a.b=c ...]
"""

import sys

from lgtm_ds.config import parse_args
from lgtm_ds.ds_engine import shutdown_distributed
from lgtm_ds.errors import LGTMError
from lgtm_ds.trainer import run


def main() -> int:
    try:
        cfg, _ = parse_args(sys.argv[1:])
        run(cfg)
    except LGTMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
