"""Atomic file writes: a reader (or a crash) never sees a half-written file.

The text goes to a temporary file in the same folder, is flushed and fsync-ed, then
``os.replace``-d over the target; on any error the temporary file is removed and the old file
(if any) is left as it was.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically; creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fchmod(fh.fileno(), 0o666 & ~_umask())  # mkstemp's 0600 -> a normal file's mode
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as strict JSON (indent=1, trailing newline; non-finite floats as null), written
    atomically; creates the parent folder."""
    atomic_write_text(path, json.dumps(finite_json(obj)[0], indent=1, allow_nan=False) + "\n")


def finite_json(obj: Any, where: str = "") -> tuple[Any, list[str]]:
    """``obj`` with every NaN/inf float replaced by None (strict JSON has no NaN), and the
    dotted paths of the replaced values."""
    if isinstance(obj, float):
        return (obj, []) if math.isfinite(obj) else (None, [where])
    if isinstance(obj, dict):
        out, bad = {}, []
        for k, v in obj.items():
            out[k], b = finite_json(v, f"{where}.{k}" if where else str(k))
            bad += b
        return out, bad
    if isinstance(obj, list | tuple):
        out, bad = [], []
        for i, v in enumerate(obj):
            o, b = finite_json(v, f"{where}[{i}]")
            out.append(o)
            bad += b
        return out, bad
    return obj, []
