"""``launch/train.py``: parse the command line, run, one clear error line on bad input."""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    from ..errors import LGTMError
    from . import signals

    signals.install()  # SIGINT / SIGTERM: a summary, one line, 130 / 143
    signals.watch_launcher()  # a rank whose launcher died ends itself
    main_rank = os.environ.get("RANK", "0") == "0"
    try:
        from ..config import parse_args

        cfg, args = parse_args(sys.argv[1:] if argv is None else argv)
        configure_console(args.log_level)
        from ..engines.dist import shutdown_distributed
        from .trainer import run

        run(cfg)
    except LGTMError as e:
        # every rank meets the same bad input: one copy of the message, from the global rank 0
        if main_rank:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except signals.Interrupted as e:
        if main_rank:
            print(e.message or f"interrupted ({e.name})", file=sys.stderr, flush=True)
        return e.exit_code
    shutdown_distributed()
    return 0


def configure_console(level: str) -> None:
    """What the ranks print besides LGTM-DS's own bar, warnings and summary. ``warning``:
    DeepSpeed's logger at WARNING (and no "Setting accelerator to CPU" notice on machines
    without CUDA), no ``datasets`` / ``transformers`` progress bars, no FutureWarning /
    DeprecationWarning from the libraries; ``info`` / ``debug``: their INFO (DEBUG) lines and
    bars too. Called by the command line only: a notebook's ``run(cfg)`` leaves logging alone."""
    import logging
    import warnings

    lvl = getattr(logging, level.upper())
    quiet = lvl >= logging.WARNING
    import datasets
    import transformers

    from ..engines.dist import set_log_level

    set_log_level(lvl)
    transformers.utils.logging.set_verbosity(max(lvl, logging.WARNING) if quiet else lvl)
    if quiet:
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
        for category in (FutureWarning, DeprecationWarning):
            for module in ("torch", "deepspeed", "transformers", "datasets"):
                warnings.filterwarnings("ignore", category=category, module=module)
