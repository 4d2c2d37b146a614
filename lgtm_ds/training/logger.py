"""Metrics as JSON lines on rank 0, and optionally Weights & Biases (imported lazily)."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from ..io import finite_json


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

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        row = {"time": round(time.time(), 3), **row}
        safe, bad = finite_json(row)  # strict JSON: NaN/inf -> null, named in "nonfinite"
        if bad:
            safe["nonfinite"] = bad
        self.fh.write(json.dumps(safe, allow_nan=False) + "\n")
        self.fh.flush()
        self.rows += 1
        if self.run is not None:
            step = row.get("step")
            if step is not None and row.get("stage") != 1:
                step += self.step_offset
            self.run.log(
                {k: v for k, v in row.items() if isinstance(v, int | float) and k != "step"},
                step=step,
            )

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
