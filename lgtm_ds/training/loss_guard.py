"""The loss-spike guard: a divergence that stays finite (losses from ~1 to 1e5, no inf or NaN,
so no step is skipped) stops the run, as ``train.max_skipped_steps`` does for a non-finite one.

Per loss series (``teacher_loss``, ``student_loss``; ``teacher_ce`` in vanilla KD's stage 1): a
step's loss is a spike when it is above ``factor`` times the series' reference, the lowest
running median seen so far (the median of the last :data:`WINDOW` losses, of fewer in the
first steps: the first loss is its own median), and never below ``floor``. The lowest median,
not the current one: a loss that jumps and stays up raises the current median with it; and
from the first step, since learning rates far too high can blow a loss up by step 2. The first
``warmup`` losses of a series are not judged (they still set the reference: a jump at step 3
is caught once the warm-up is past). ``steps`` spikes in a row stop the run. Plain Python: the
trainer feeds it the losses (averaged over ranks, so every rank judges alike and stops
together)."""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

WINDOW = 5  # losses in the running median: a single spike does not move it


@dataclass
class Spike:
    """A series over its bound at ``step``: ``in_a_row`` spikes so far, the first at ``first``;
    ``reference``: the lowest running median ``median``, raised to the floor if below it."""

    name: str
    loss: float
    reference: float
    step: int
    in_a_row: int
    median: float

    def describe_reference(self) -> str:
        raised = ", raised to train.loss_spike_floor" if self.median < self.reference else ""
        return f"{self.reference:.4g} (the lowest running median {self.median:.4g}{raised})"

    @property
    def first(self) -> int:
        return self.step - self.in_a_row + 1


class LossSpikeGuard:
    """``update(step, losses)`` once per optimizer step; ``factor`` 0 turns it off."""

    def __init__(self, factor: float, steps: int, warmup: int, floor: float):
        self.factor, self.steps, self.warmup, self.floor = factor, steps, warmup, floor
        self.recent: dict[str, deque] = {}  # per series: the last WINDOW losses
        self.seen: dict[str, int] = {}  # per series: finite losses so far
        self.reference: dict[str, float] = {}  # per series: the lowest running median so far
        self.in_a_row: dict[str, int] = {}

    @property
    def enabled(self) -> bool:
        return self.factor > 0

    def bound(self, name: str) -> float:
        """The loss above which a step of ``name`` is a spike (inf before a reference)."""
        ref = self.reference.get(name)
        return math.inf if ref is None else self.factor * max(ref, self.floor)

    def update(self, step: int, losses: dict[str, float]) -> list[Spike]:
        """Judge this step's losses (a non-finite one is left to the skipped-step guard), then
        add them to the running medians; the spikes of this step, each with its count in a
        row (the run stops at ``in_a_row >= steps``)."""
        spikes = []
        if not self.enabled:
            return spikes
        for name, loss in losses.items():
            if not math.isfinite(loss):
                continue
            seen = self.seen.get(name, 0) + 1
            self.seen[name] = seen
            if seen > self.warmup and loss > self.bound(name):
                self.in_a_row[name] = self.in_a_row.get(name, 0) + 1
                low = self.reference[name]
                spikes.append(
                    Spike(name, loss, max(low, self.floor), step, self.in_a_row[name], low)
                )
            else:
                self.in_a_row[name] = 0
            recent = self.recent.setdefault(name, deque(maxlen=WINDOW))
            recent.append(loss)
            median = statistics.median(recent)
            self.reference[name] = min(self.reference.get(name, math.inf), median)
        return spikes

    def diverged(self, spikes: list[Spike]) -> Spike | None:
        """The first spike held ``steps`` steps in a row, if any."""
        return next((s for s in spikes if s.in_a_row >= self.steps), None)

    def state_dict(self) -> dict:
        return {
            "recent": {k: list(v) for k, v in self.recent.items()},
            "seen": dict(self.seen),
            "reference": dict(self.reference),
            "in_a_row": dict(self.in_a_row),
        }

    def load_state_dict(self, state: dict) -> None:
        self.recent = {k: deque(v, maxlen=WINDOW) for k, v in state.get("recent", {}).items()}
        self.seen = dict(state.get("seen", {}))
        self.reference = dict(state.get("reference", {}))
        self.in_a_row = dict(state.get("in_a_row", {}))
