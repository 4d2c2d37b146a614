"""Influence telemetry of LGTM runs: ``influence.jsonl`` in the run folder.

One row per (optimizer step, training example) of the global batch, written by rank 0 from
every rank's rows::

    {"step": 12, "epoch": 0, "index": 345, "influence": -1.3e-07,
     "teacher_p_gold": 0.71, "student_p_gold": 0.55}

``index`` is the example's row in the source's training data (the ``source_index`` column that
``load_task`` keeps through encoding: the same numbering as ``quiz_indices`` in
``data_split.json``); ``influence`` is what ``Distiller.step`` returns for it (per sequence for
decoders); the ``teacher_*`` / ``student_*`` columns are the task's ``example_stat`` of both
models at the step's starting point (``p_gold``: the gold label's probability; ``ce``: a
sequence's mean token CE; ``sq_err`` for regression). ``output.influence_log_examples`` tracks a
seeded random subset of examples only; ``output.influence_log_max_rows`` caps the file. A resumed
run cuts the file back to its checkpoint, like ``metrics.jsonl``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..engines.dist import all_gather_object
from .logger import JsonlFile

FILE = "influence.jsonl"


class InfluenceLog:
    """``influence.jsonl`` writer. :meth:`add` is a collective (every rank calls it)."""

    def __init__(
        self,
        path: Path,
        *,
        is_main: bool,
        resume: bool,
        source_indices: Sequence[int],
        examples: int | None,
        max_rows: int,
        seed: int,
    ):
        self.file = JsonlFile(path, enabled=is_main, resume=resume)
        self.max_rows = max_rows
        self.capped = False
        self.tracked: frozenset[int] | None = None
        if examples is not None and examples < len(source_indices):
            pick = np.random.default_rng([seed, 7]).choice(
                np.asarray(source_indices), examples, replace=False
            )
            self.tracked = frozenset(int(i) for i in pick)

    @property
    def rows(self) -> int:
        return self.file.rows

    def add(
        self,
        step: int,
        epoch: int,
        micro: list[dict],
        influence: torch.Tensor,
        stats: dict[str, torch.Tensor],
    ) -> np.ndarray:
        """Gather this step's rows from all ranks and append the tracked ones (rank 0).
        Returns the influence of the whole global batch (every rank gets it)."""
        index = [mb.get("source_index") for mb in micro]
        local = {
            "index": (
                torch.cat(index).tolist()
                if all(i is not None for i in index)
                else [None] * influence.numel()
            ),
            "influence": influence.double().tolist(),
            **{k: v.double().tolist() for k, v in stats.items()},
        }
        parts = all_gather_object(local)
        merged = {k: [x for p in parts for x in p[k]] for k in local}
        if self.file.enabled and not self.capped:
            keys = list(stats)
            for n, idx in enumerate(merged["index"]):
                if self.tracked is not None and idx not in self.tracked:
                    continue
                if self.rows >= self.max_rows:
                    self.capped = True
                    break
                row = {"step": step, "epoch": epoch, "index": idx}
                row["influence"] = merged["influence"][n]
                row.update({k: merged[k][n] for k in keys})
                self.file.write(row, flush=False)
            self.file.flush()
        return np.asarray(merged["influence"], dtype=np.float64)

    def truncate(self, rows: int | None) -> None:
        self.file.truncate(rows)

    def close(self) -> None:
        self.file.close()
