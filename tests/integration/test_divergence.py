"""The divergence guard: a non-finite gradient, loss or influence skips the step in the engines
(parameters, optimizer state and LR schedule untouched), the trainer counts it, and a run that
keeps skipping stops with one error and a summary marked failed; metrics stay strict JSON.

The runs (trainer, ranks, processes); the in-process tests:
``tests/unit/test_divergence.py``."""

import json

import pytest

from lgtm_ds import ConfigError
from lgtm_ds.config import load_config
from lgtm_ds.errors import TrainingError

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


def test_a_finite_divergence_stops_with_a_named_reason(tmp_path, dist_env):
    """Learning rates far too high: the losses go from ~1e2 to ~1e4 and stay finite (no step
    skipped); the loss-spike guard stops the run, the summary says diverged and why."""
    out = tmp_path / "out"
    with pytest.raises(
        TrainingError, match=r"training diverged: (teacher|student)_loss .* above 10 x"
    ):
        _run(
            out,
            "method.name=online_kd",
            "train.student_lr=1e2",
            "train.teacher_lr=1e2",
            "train.max_steps=40",
            "train.eval_every=0",
            "train.loss_spike_warmup=5",
            "train.loss_spike_steps=3",
        )
    summary = _strict_json((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["skipped_steps"] == 0
    assert "the lowest running median" in summary["failure"]
    assert "for 3 steps in a row" in summary["failure"] and summary["steps"] < 40
    assert not (out / "student").exists()
    with pytest.raises(ConfigError, match="failed"):  # the same command again: refused
        _run(out, "method.name=online_kd")
