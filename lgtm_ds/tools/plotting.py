"""matplotlib for the tools: headless (Agg), optional (the ``plots`` extra), atomic PNGs."""

from __future__ import annotations

import os
from pathlib import Path


def pyplot(what: str):
    """``matplotlib.pyplot`` on the Agg backend, or None (and a note naming ``what``) when
    matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed: no {what} (pip install 'lgtm-ds[plots]')")
        return None
    return plt


def save_png(fig, path: Path) -> None:
    """``fig`` to ``path`` via a temporary file and a rename: never a half-written PNG."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(path.name + ".tmp.png")
    try:
        fig.savefig(tmp)
    finally:
        plt.close(fig)
    os.replace(tmp, path)
