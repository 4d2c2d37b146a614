"""The divergence guard: a non-finite gradient, loss or influence skips the step in the engines
(parameters, optimizer state and LR schedule untouched), the trainer counts it, and a run that
keeps skipping stops with one error and a summary marked failed; metrics stay strict JSON."""

import pytest
import torch

from lgtm_ds import Distiller
from lgtm_ds.engines import TorchEngine
from lgtm_ds.engines.optim import build_adamw, warmup_linear

from ..helpers import make_distiller, random_batch, tiny_model


def _snapshot(model, opt, sched):
    return (
        [p.detach().clone() for p in model.parameters()],
        {k: [t.clone() for t in v.values() if torch.is_tensor(t)] for k, v in opt.state.items()},
        sched.last_epoch,
    )


@pytest.mark.slow  # the fast lane (tests/unit -m 'not slow') leaves it out
def test_engine_skips_a_nonfinite_step_and_applies_the_next():
    model = tiny_model(torch.float32, seed=3)
    opt = build_adamw(model, 1e-3, 0.01)
    sched = warmup_linear(opt, 10, 0.2)
    eng = TorchEngine(model, opt, sched, gradient_accumulation_steps=2)

    def micro_steps(scale):
        for seed in (1, 2):
            b = random_batch(5, seed)
            loss = eng.forward(b).float().pow(2).mean() * scale
            eng.backward(loss)
            eng.step()

    micro_steps(1.0)
    assert not eng.step_skipped
    params, state, epoch = _snapshot(model, opt, sched)
    lr = eng.lr()
    micro_steps(float("nan"))  # one NaN micro-batch would do; both are NaN here
    assert eng.step_skipped
    params2, state2, epoch2 = _snapshot(model, opt, sched)
    assert all(torch.equal(a, b) for a, b in zip(params, params2))
    assert all(torch.equal(a, b) for k in state for a, b in zip(state[k], state2[k]))
    assert epoch2 == epoch and eng.lr() == lr  # the schedule did not advance
    assert all(p.grad is None for p in model.parameters())  # the bad gradients are gone
    micro_steps(1.0)
    assert not eng.step_skipped
    assert any(not torch.equal(a, p) for a, p in zip(params, model.parameters()))
    assert sched.last_epoch == epoch + 1


def test_vanilla_kd_student_step_is_skipped_on_a_nonfinite_target():
    t, s = tiny_model(torch.float32, seed=1), tiny_model(torch.float32, seed=2)
    with torch.no_grad():
        next(t.parameters()).fill_(float("inf"))  # the frozen teacher's logits are not finite
    s0 = [p.detach().clone() for p in s.parameters()]
    d = Distiller("vanilla_kd", teacher=t, student=s, student_optimizer=build_adamw(s, 1e-3, 0))
    m = d.step(random_batch(8, 1))
    assert m["skipped"] == "student"
    assert all(torch.equal(p, p0) for p, p0 in zip(s.parameters(), s0))


@pytest.mark.parametrize("method", ["lgtm", "online_kd"])
@pytest.mark.parametrize("role", ["teacher", "student"])
def test_nonfinite_model_skips_both_engines(method, role):
    t, s = tiny_model(torch.float32, seed=1), tiny_model(torch.float32, seed=2)
    with torch.no_grad():
        (t if role == "teacher" else s).classifier.bias.fill_(float("nan"))
    t0 = [p.detach().clone() for p in t.parameters()]
    s0 = [p.detach().clone() for p in s.parameters()]
    d = make_distiller(method, t, s)
    m = d.step(random_batch(8, 1), random_batch(8, 2) if method == "lgtm" else None)
    assert m["skipped"] == "both"
    same = lambda a, b: torch.equal(a.nan_to_num(), b.nan_to_num())  # noqa: E731
    assert all(same(p, p0) for p, p0 in zip(t.parameters(), t0))
    assert all(same(p, p0) for p, p0 in zip(s.parameters(), s0))
