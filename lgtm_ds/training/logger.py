"""Metrics as JSON lines on rank 0, and optionally Weights & Biases (imported lazily)."""

from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsLogger:
    def __init__(
        self,
        path: Path,
        *,
        enabled: bool,
        wandb: bool = False,
        project: str = "lgtm-ds",
        run_name: str | None = None,
        config: dict | None = None,
        resume: bool = False,
    ):
        self.enabled = enabled
        self.path = path
        self.fh = open(path, "a" if resume else "w") if enabled else None  # noqa: SIM115
        self.rows = self._count() if enabled and resume else 0  # lines in metrics.jsonl
        self.run = None
        if enabled and wandb:
            try:
                import wandb as wb
            except ImportError as e:
                from ..errors import ConfigError

                raise ConfigError(
                    "output.wandb=true but wandb is not installed (pip install 'lgtm-ds[wandb]')"
                ) from e
            self.run = wb.init(project=project, name=run_name, config=config, dir=str(path.parent))

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        row = {"time": round(time.time(), 3), **row}
        self.fh.write(json.dumps(row) + "\n")
        self.fh.flush()
        self.rows += 1
        if self.run is not None:
            step = row.get("step")
            self.run.log({k: v for k, v in row.items() if isinstance(v, int | float)}, step=step)

    def _count(self) -> int:
        with open(self.path) as fh:
            return sum(1 for _ in fh)

    def truncate(self, rows: int | None) -> None:
        """Keep the first ``rows`` lines (a resumed run cuts what came after its checkpoint);
        None: keep everything."""
        if not self.enabled or rows is None or rows >= self.rows:
            return
        self.fh.close()
        with open(self.path) as fh:
            kept = [line for _, line in zip(range(rows), fh)]
        from ..io import atomic_write_text

        atomic_write_text(self.path, "".join(kept))
        self.fh = open(self.path, "a")  # noqa: SIM115
        self.rows = rows

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None
        if self.run is not None:
            self.run.finish()
            self.run = None
