"""Metrics as JSON lines on rank 0, and optionally Weights & Biases (imported lazily)."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import numpy as np

from ..io import atomic_write_text, finite_json


class JsonlFile:
    """An append-only JSON-lines file (strict JSON: NaN/inf -> null, the keys listed in
    ``"nonfinite"``) that a resumed run cuts back to its checkpoint's row count. Disabled (on
    ranks other than 0): every call is a no-op."""

    def __init__(self, path: Path, *, enabled: bool, resume: bool = False):
        self.enabled, self.path = enabled, path
        self.fh = open(path, "a" if resume else "w") if enabled else None  # noqa: SIM115
        self.rows = self._count() if enabled and resume else 0

    def write(self, row: dict, flush: bool = True) -> None:
        if self.fh is None:
            return
        safe, bad = finite_json(row)
        if bad:
            safe["nonfinite"] = bad
        self.fh.write(json.dumps(safe, allow_nan=False) + "\n")
        if flush:
            self.fh.flush()
        self.rows += 1

    def flush(self) -> None:
        if self.fh is not None:
            self.fh.flush()

    def _count(self) -> int:
        with open(self.path) as fh:
            return sum(1 for _ in fh)

    def truncate(self, rows: int | None) -> None:
        """Keep the first ``rows`` lines (a resumed run cuts what came after its checkpoint);
        None: keep everything."""
        if self.fh is None or rows is None or rows >= self.rows:
            return
        self.fh.close()
        with open(self.path) as fh:
            kept = [line for _, line in zip(range(rows), fh)]
        atomic_write_text(self.path, "".join(kept))
        self.fh = open(self.path, "a")  # noqa: SIM115
        self.rows = rows

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


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
        self.file = JsonlFile(path, enabled=enabled, resume=resume)  # metrics.jsonl
        self.run = None
        if enabled and wandb:
            try:
                import wandb as wb
            except ImportError as e:
                from ..errors import ConfigError

                raise ConfigError(
                    "output.wandb=true but wandb is not installed (pip install 'lgtm-ds[wandb]')"
                ) from e
            # one W&B run for the whole job: a resumed run continues it (same id); rows that
            # are logged again after a resume (steps past the checkpoint) are dropped by W&B,
            # which already has them (the resumed run repeats them exactly)
            id_file = path.parent / "wandb_run_id"
            run_id = id_file.read_text().strip() if resume and id_file.exists() else None
            if not run_id:
                run_id = uuid.uuid4().hex[:8]  # W&B's own id format: 8 lowercase alnum
                id_file.write_text(run_id + "\n")
            self.run = wb.init(
                project=project,
                name=run_name,
                config=config,
                dir=str(path.parent),
                id=run_id,
                resume="allow",
            )
        # W&B needs increasing steps: teacher stage-1 rows use their own step, later rows come
        # after them (step + step_offset; the trainer sets the offset to the stage-1 steps)
        self.step_offset = 0

    @property
    def rows(self) -> int:
        return self.file.rows  # lines in metrics.jsonl

    def log(self, row: dict, histograms: dict | None = None, tables: dict | None = None) -> None:
        """One row to metrics.jsonl (and W&B). ``histograms``: name -> 1-D values, to W&B only
        (``wandb.Histogram``) at the row's step; ``tables``: name -> (columns, rows), to W&B
        only (``wandb.Table``, e.g. the generation eval's completions)."""
        if not self.enabled:
            return
        row = {"time": round(time.time(), 3), **row}
        self.file.write(row)
        if self.run is not None:
            step = row.get("step")
            if step is not None and row.get("stage") != 1:
                step += self.step_offset
            data = {k: v for k, v in row.items() if isinstance(v, int | float) and k != "step"}
            if histograms:
                import wandb as wb

                for name, values in histograms.items():
                    data[name] = wb.Histogram(np.asarray(values, dtype=np.float64))
            if tables:
                import wandb as wb

                for name, (columns, rows) in tables.items():
                    data[name] = wb.Table(columns=list(columns), data=[list(r) for r in rows])
            self.run.log(data, step=step)

    def truncate(self, rows: int | None) -> None:
        self.file.truncate(rows)

    def close(self) -> None:
        self.file.close()
        if self.run is not None:
            self.run.finish()
            self.run = None
