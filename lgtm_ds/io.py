"""Atomic file writes: a reader (or a crash) never sees a half-written file.

The text goes to a temporary file in the same folder, is flushed and fsync-ed, then
``os.replace``-d over the target; on any error the temporary file is removed and the old file
(if any) is left as it was.
"""

from __future__ import annotations

import json
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
    """``obj`` as JSON (indent=1, trailing newline), written atomically; creates the parent
    folder."""
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")
