"""On-policy distillation through the trainer: a run killed after a checkpoint and resumed
equals the uninterrupted run bit for bit (CPU, fp32, dropout on: the draw, the sampling and the
training RNG all continue where they were), its telemetry and ``generations/`` samples; the
prompt-room check fails before any output is written. The in-process tests:
tests/unit/test_onpolicy.py."""

import json

import pytest
import torch

from lgtm_ds import ConfigError
from lgtm_ds.config import load_config

from ..helpers import ROOT

EXAMPLE = f"{ROOT}/configs/examples/causal_lm_tiny.yaml"
SMALL = [
    "data.synthetic_examples=300",
    "data.max_length=48",
    "train.micro_batch_size=8",
    "train.eval_batch_size=64",
    "train.log_every=1",
    "train.eval_every=0",
    "model.dropout=0.1",
    "method.lmbda=0.5",
    "method.generation.temperature=1.0",
    "method.generation.top_p=0.95",
    "method.generation.max_new_tokens=8",
    "method.generation.sample_every=2",
]


class Crash(Exception):
    pass


def _trainer(out, *overrides):
    from lgtm_ds.training import Trainer

    return Trainer(load_config(EXAMPLE, [f"output.dir={out}", *SMALL, *overrides]))


def _params(tr):
    return [p.detach().clone() for e in (tr.student, tr.teacher) for p in e.module.parameters()]


def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_resumed_onpolicy_run_equals_the_uninterrupted_one(tmp_path, dist_env):
    common = ["method.name=lgtm", "train.max_steps=5", "output.checkpoint_every=2"]
    ref = _trainer(tmp_path / "ref", *common)
    ref.finish(ref.train())
    want = _params(ref)
    ref_rows = [r for r in _rows(tmp_path / "ref") if "onpolicy" in r]
    assert len(ref_rows) == 5 and {r["onpolicy"] for r in ref_rows} == {0.0, 1.0}
    for r in ref_rows:
        if r["onpolicy"]:
            assert 0 < r["gen_len_mean"] <= 8 and r["gen_tokens_per_s"] > 0
        assert r["train_tokens_per_s"] > 0
    gens = sorted(p.name for p in (tmp_path / "ref" / "generations").glob("train_step*.jsonl"))
    assert gens, "no generations/ sample"
    sample = [json.loads(x) for x in (tmp_path / "ref" / "generations" / gens[0]).open()]
    assert sample[0]["by"] == "student" and sample[0]["prompt"] and sample[0]["completion_ids"]

    job = [*common, "output.resume=auto"]
    first = _trainer(tmp_path / "job", *job)
    orig, calls = first.distiller.step, [0]

    def crash_after_three(*a, **k):  # killed during step 4, after the checkpoint at step 2
        calls[0] += 1
        if calls[0] > 3:
            raise Crash
        return orig(*a, **k)

    first.distiller.step = crash_after_three
    with pytest.raises(Crash):
        first.train()
    second = _trainer(tmp_path / "job", *job)
    assert second.distiller.onpolicy.steps == 2
    second.finish(second.train())
    assert all(torch.equal(p, q) for p, q in zip(_params(second), want))
    keys = ("step", "onpolicy", "onpolicy_fraction", "gen_len_mean", "student_loss")
    got = [r for r in _rows(tmp_path / "job") if "onpolicy" in r]
    assert [[r.get(k) for k in keys] for r in got] == [[r.get(k) for k in keys] for r in ref_rows]
    for name in gens:
        ref_text = (tmp_path / "ref" / "generations" / name).read_text()
        assert (tmp_path / "job" / "generations" / name).read_text() == ref_text


def test_lmbda_schedule_through_the_trainer(tmp_path, dist_env, capsys):
    """``lmbda`` 1 after an off-policy phase of one step: the first step trains on the data
    set, the next two on the student's samples, and the rows say so; a start step past the
    run's end is one warning."""
    sched = ["method.name=online_kd", "method.lmbda=1.0", "train.max_steps=3"]
    tr = _trainer(tmp_path / "a", *sched, "method.lmbda_start_step=1")
    tr.finish(tr.train())
    rows = [r for r in _rows(tmp_path / "a") if "onpolicy" in r]
    assert [(r["onpolicy"], r["lmbda"]) for r in rows] == [(0.0, 0.0), (1.0, 1.0), (1.0, 1.0)]
    assert "gen_len_mean" not in rows[0] and rows[1]["gen_len_mean"] > 0
    capsys.readouterr()
    _trainer(tmp_path / "b", *sched, "method.lmbda_start_step=3").lock.release()
    assert "method.lmbda_start_step=3 is not before the end" in capsys.readouterr().out


def test_no_room_to_generate_fails_before_any_output(tmp_path, dist_env):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="max_new_tokens=48 does not fit: the longest"):
        _trainer(out, "method.generation.max_new_tokens=48")
    assert not out.exists()


@pytest.mark.slow
def test_two_rank_resume_equals_the_uninterrupted_run(tmp_path):
    """2 CPU ranks, ZeRO-2, dropout 0.1, lmbda 0.5, temperature 1: a job killed on every rank
    at the start of step 4 (after the step-2 checkpoint) and resumed ends with the models and
    the metrics rows of the uninterrupted 5-step run, bit for bit."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from ..helpers import clean_env, free_port

    def launch(script, out, env=None, ranks=2):
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
               "--master_port", str(free_port()), script, "--config", EXAMPLE,
               "--ds_config", f"{ROOT}/ds_configs/zero2.json", f"--output.dir={out}",
               *[f"--{o}" for o in SMALL], "--train.max_steps=5", "--output.checkpoint_every=2",
               "--output.resume=auto"]  # fmt: skip
        return subprocess.run(cmd, env={**clean_env(), **(env or {})}, cwd=ROOT,
                              capture_output=True, text=True, timeout=900)  # fmt: skip

    train = os.path.join(ROOT, "launch", "train.py")
    ref = launch(train, tmp_path / "ref")
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    crash = os.path.join(ROOT, "tests", "onpolicy_crash_worker.py")
    killed = launch(crash, tmp_path / "job", {"CRASH_AT": "4"})
    assert killed.returncode != 0
    assert (tmp_path / "job" / "checkpoints" / "latest").read_text().strip() == "step2"
    again = launch(train, tmp_path / "job")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    for role in ("student", "teacher"):
        want = load_file(tmp_path / "ref" / role / "model.safetensors")
        got = load_file(tmp_path / "job" / role / "model.safetensors")
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want), role
    keys = ("step", "onpolicy", "onpolicy_fraction", "gen_len_mean", "student_loss")
    rows = [[r.get(k) for k in keys] for r in _rows(tmp_path / "job") if "onpolicy" in r]
    ref_rows = [[r.get(k) for k in keys] for r in _rows(tmp_path / "ref") if "onpolicy" in r]
    assert rows == ref_rows and {r[1] for r in ref_rows} == {0.0, 1.0}
