"""The loss-spike guard's detector (a divergence that stays finite): a spike held ``steps`` steps
stops, a single spike or a spike in the warm-up does not, nor does a healthy curve. The run that
stops: ``tests/integration/test_divergence.py``."""

import json
import math
import random

from lgtm_ds.training.loss_guard import LossSpikeGuard


def _feed(guard, curve, name="student_loss", start=1):
    """Feed ``curve``; the step it stops at (None: it ran through) and every spike seen."""
    seen = []
    for step, loss in enumerate(curve, start):
        spikes = guard.update(step, {name: loss})
        seen += spikes
        if guard.diverged(spikes):
            return step, seen
    return None, seen


def _noisy_decay(n, rng, start=2.3, end=0.4):
    """A healthy curve: exponential decay with +-15% noise (no zeros)."""
    return [end + (start - end) * math.exp(-i / 40) * rng.uniform(0.85, 1.15) for i in range(n)]


def test_a_spike_held_for_steps_in_a_row_stops_the_run():
    rng = random.Random(7)
    curve = _noisy_decay(30, rng) + [50.0 + rng.random() for _ in range(10)]
    guard = LossSpikeGuard(factor=10, steps=5, warmup=20, floor=1.0)
    stop, spikes = _feed(guard, curve)
    assert stop == 35  # spikes at steps 31..35
    s = spikes[-1]
    assert s.name == "student_loss" and s.in_a_row == 5 and s.first == 31
    assert s.loss > 50 and 1.0 <= s.reference < 3  # the reference is before the jump


def test_a_single_spike_or_one_short_of_the_count_does_not_stop():
    rng = random.Random(11)
    curve = _noisy_decay(30, rng)
    curve[25] = 1e5  # one step
    curve[27:31] = [1e5] * 4  # four in a row: one short of steps=5
    guard = LossSpikeGuard(factor=10, steps=5, warmup=20, floor=1.0)
    stop, spikes = _feed(guard, curve + _noisy_decay(10, rng, start=0.5))
    assert stop is None
    assert [s.in_a_row for s in spikes] == [1, 1, 2, 3, 4]


def test_a_jump_in_the_warm_up_is_caught_once_the_warm_up_is_past():
    """A loss that jumps from 0.75 to 27 at step 3 and stays there: its current running median
    is 27, its lowest one (of steps 1-2) is not."""
    guard = LossSpikeGuard(factor=10, steps=5, warmup=20, floor=0.5)
    curve = [0.81, 0.75] + [27.0 + 0.1 * i for i in range(40)]
    stop, spikes = _feed(guard, curve)
    assert spikes[0].step == 21  # nothing judged in the warm-up
    assert stop == 25 and math.isclose(spikes[-1].reference, (0.81 + 0.75) / 2)


def test_no_stop_in_the_warm_up():
    guard = LossSpikeGuard(factor=10, steps=2, warmup=20, floor=1.0)
    stop, spikes = _feed(guard, [0.9, 0.8, 0.85] + [400.0] * 17)
    assert stop is None and spikes == []


def test_healthy_curves_never_fire():
    rng = random.Random(3)
    for start, end in ((2.3, 0.4), (10.8, 3.1), (0.7, 0.02)):
        guard = LossSpikeGuard(factor=10, steps=5, warmup=20, floor=1.0)
        stop, spikes = _feed(guard, _noisy_decay(300, rng, start, end))
        assert stop is None and spikes == []


def test_the_floor_keeps_a_loss_near_zero_from_firing():
    """A KL of two alike models: 1e-3 at first, then 0.5 (500 x, but far below the floor's
    bound); below the floor the bound is factor x floor."""
    curve = [1e-3, 1.2e-3, 0.9e-3] + [0.5] * 30 + [20.0] * 5
    guard = LossSpikeGuard(factor=10, steps=5, warmup=20, floor=1.0)
    stop, spikes = _feed(guard, curve)
    assert stop == len(curve) and spikes[0].loss == 20.0 and spikes[0].reference == 1.0
    assert spikes[0].median == 1e-3  # the first loss: its own median, the lowest
    assert "raised to train.loss_spike_floor" in spikes[0].describe_reference()


def test_each_series_is_judged_alone_and_nonfinite_losses_are_left_out():
    guard = LossSpikeGuard(factor=10, steps=3, warmup=3, floor=0.1)
    for step in range(1, 6):
        assert guard.update(step, {"teacher_loss": 0.5, "student_loss": 0.6}) == []
    assert guard.update(6, {"teacher_loss": float("nan"), "student_loss": 0.6}) == []
    for step in range(7, 10):
        spikes = guard.update(step, {"teacher_loss": 9.0, "student_loss": 0.6})
    assert [s.name for s in spikes] == ["teacher_loss"] and guard.diverged(spikes).first == 7


def test_factor_zero_is_off_and_the_state_round_trips():
    off = LossSpikeGuard(factor=0, steps=1, warmup=0, floor=1.0)
    assert not off.enabled and _feed(off, [1.0, 1.0, 1.0, 1e9]) == (None, [])
    rng = random.Random(5)
    curve = _noisy_decay(25, rng) + [80.0] * 6
    a = LossSpikeGuard(factor=10, steps=5, warmup=20, floor=1.0)
    b = LossSpikeGuard(factor=10, steps=5, warmup=20, floor=1.0)
    _feed(a, curve[:27])  # two spikes in a row so far (steps 26, 27)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # as a checkpoint stores it
    # a resumed run judges as the uninterrupted one
    resumed = _feed(b, curve[27:], start=28)
    assert resumed == _feed(a, curve[27:], start=28) and resumed[0] == 30
