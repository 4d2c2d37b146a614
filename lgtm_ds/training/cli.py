"""``launch/train.py``: parse the command line, run, one clear error line on bad input."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from ..config import parse_args
    from ..errors import LGTMError

    try:
        cfg, _ = parse_args(sys.argv[1:] if argv is None else argv)
        from ..engines.deepspeed import shutdown_distributed
        from .trainer import run

        run(cfg)
    except LGTMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    shutdown_distributed()
    return 0
