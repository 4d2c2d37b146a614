"""The divergence guard: a non-finite gradient, loss or influence skips the step in the engines
(parameters, optimizer state and LR schedule untouched), the trainer counts it, and a run that
keeps skipping stops with one error and a summary marked failed; metrics stay strict JSON."""

import json

import pytest
import torch

from lgtm_ds import ConfigError, Distiller
from lgtm_ds.config import load_config
from lgtm_ds.engines import TorchEngine
from lgtm_ds.engines.optim import build_adamw, warmup_linear
from lgtm_ds.errors import TrainingError

from .helpers import random_batch, tiny_model

SMALL = [
    "data.synthetic_examples=400",
    "train.micro_batch_size=8",
    "train.eval_batch_size=64",
    "train.log_every=4",
]


def _strict_json(text: str):
    def refuse(c):
        raise ValueError(f"non-strict JSON constant {c}")

    return json.loads(text, parse_constant=refuse)


def _snapshot(model, opt, sched):
    return (
        [p.detach().clone() for p in model.parameters()],
        {k: [t.clone() for t in v.values() if torch.is_tensor(t)] for k, v in opt.state.items()},
        sched.last_epoch,
    )


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
    d = Distiller(
        method,
        teacher=t,
        student=s,
        teacher_optimizer=build_adamw(t, 1e-3, 0),
        student_optimizer=build_adamw(s, 1e-3, 0),
    )
    m = d.step(random_batch(8, 1), random_batch(8, 2) if method == "lgtm" else None)
    assert m["skipped"] == "both"
    same = lambda a, b: torch.equal(a.nan_to_num(), b.nan_to_num())  # noqa: E731
    assert all(same(p, p0) for p, p0 in zip(t.parameters(), t0))
    assert all(same(p, p0) for p, p0 in zip(s.parameters(), s0))


def _run(out, *overrides):
    from lgtm_ds.training import run

    return run(load_config(None, [f"output.dir={out}", *SMALL, *overrides]))


@pytest.mark.parametrize(
    "method,extra",
    [
        ("lgtm", []),
        ("online_kd", ["deepspeed.config=ds_configs/zero0.json"]),  # the client AdamW's guard
        ("vanilla_kd", ["method.teacher_stage1_epochs=1"]),  # diverges in stage 1
    ],
)
def test_diverging_run_stops_with_a_failed_summary(tmp_path, dist_env, method, extra):
    out = tmp_path / "out"
    with pytest.raises(TrainingError, match="3 optimizer steps in a row skipped"):
        _run(
            out,
            f"method.name={method}",
            "train.student_lr=1e6",
            "train.teacher_lr=1e6",
            "train.max_steps=40",
            "train.max_skipped_steps=3",
            "train.eval_every=0",
            *extra,
        )
    summary = _strict_json((out / "summary.json").read_text())
    assert summary["status"] == "failed" and "diverged" in summary["failure"]
    assert summary["skipped_steps"] >= 3
    assert not (out / "student").exists()  # no model that looks like a result
    assert "FAILED" in (out / "summary.txt").read_text()
    rows = [_strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in rows if r.get("skipped")]
    assert len(skipped) >= 3
    assert any(r.get("nonfinite") for r in skipped)
    for r in rows:  # every value flagged non-finite is a null
        assert all(r[k] is None for k in r.get("nonfinite", []))
    # the same command again: a clear error, also with resume=auto (it would diverge again)
    with pytest.raises(ConfigError, match="failed"):
        _run(out, f"method.name={method}", *extra)
    with pytest.raises(ConfigError, match="failed"):
        _run(out, f"method.name={method}", "output.resume=auto", *extra)


def test_max_skipped_steps_zero_never_stops(tmp_path, dist_env):
    out = tmp_path / "out"
    s = _run(
        out,
        "method.name=online_kd",
        "train.student_lr=1e6",
        "train.teacher_lr=1e6",
        "train.max_steps=12",
        "train.max_skipped_steps=0",
        "train.eval_every=0",
    )
    assert s["status"] == "completed" and s["skipped_steps"] > 0
    _strict_json((out / "summary.json").read_text())
