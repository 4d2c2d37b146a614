"""Checkpoints and resume: one command both starts and continues a job (``resume: auto``),
the resumed run equals the uninterrupted one bit for bit (vanilla KD's stage 1 included) and its
outputs cover the whole run, atomic saves (``*.partial`` + rename, ``latest`` last), retention,
and kill -9 at random moments.

The runs (trainer, ranks, processes); the in-process tests:
``tests/unit/test_resume.py``."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from lgtm_ds import ConfigError
from lgtm_ds.config import load_config

from ..helpers import ROOT, clean_env

SMALL = [
    "data.synthetic_examples=400",
    "train.micro_batch_size=8",
    "train.eval_batch_size=64",
    "train.log_every=1",
    "model.dropout=0.1",
]


class Crash(Exception):
    pass


def _params(tr):
    return [p.detach().clone() for e in (tr.student, tr.teacher) for p in e.module.parameters()]


def _trainer(out, *overrides):
    from lgtm_ds.training import Trainer

    return Trainer(load_config(None, [f"output.dir={out}", *SMALL, *overrides]))


def _crash_after(tr, n_calls, attr):
    """Make ``tr.distiller.<attr>`` raise on its (n_calls + 1)-th call (a job killed there)."""
    orig, calls = getattr(tr.distiller, attr), [0]

    def wrapped(*a, **k):
        calls[0] += 1
        if calls[0] > n_calls:
            raise Crash
        return orig(*a, **k)

    setattr(tr.distiller, attr, wrapped)


@pytest.mark.parametrize(
    "method,stage1,crash_attr,crash_after,tag",
    [
        ("lgtm", 0.2, "step", 4, "step3"),
        # stage 1 of vanilla KD: 0.2 epoch of 45 batches = 9 teacher-only steps
        ("vanilla_kd", 0.2, "teacher_finetune_step", 4, "stage1_step3"),
        # no stage 1: the teacher is frozen (no optimizer; its checkpoint is a marker)
        ("vanilla_kd", 0.0, "step", 4, "step3"),
    ],
)
def test_one_command_starts_and_continues_a_job(
    tmp_path, dist_env, method, stage1, crash_attr, crash_after, tag
):
    common = [
        f"method.name={method}",
        f"method.teacher_stage1_epochs={stage1}",
        "train.max_steps=6",
        "train.eval_every=3",
        "output.checkpoint_every=3",
    ]
    ref = _trainer(tmp_path / "ref", *common)
    ref_summary = ref.finish(ref.train())
    want = _params(ref)

    job = [*common, "output.resume=auto"]  # the same command every time
    first = _trainer(tmp_path / "job", *job)  # nothing to resume yet: a fresh start
    assert first.resume_from is None
    _crash_after(first, crash_after, crash_attr)
    with pytest.raises(Crash):
        first.train()
    assert (tmp_path / "job" / "checkpoints" / "latest").read_text() == tag
    if stage1 == 0:  # a frozen teacher's checkpoint cannot seed a run that trains it
        with pytest.raises(ConfigError, match="was frozen and is trained in this run"):
            _trainer(
                tmp_path / "job",
                *common,
                "method.name=online_kd",
                f"output.resume={tmp_path / 'job' / 'checkpoints' / tag}",
            ).train()
    second = _trainer(tmp_path / "job", *job)
    summary = second.finish(second.train())
    assert all(torch.equal(p, q) for p, q in zip(_params(second), want))

    rows = [json.loads(x) for x in (tmp_path / "job" / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [
        json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()
    ]
    strip = lambda r: {k: v for k, v in r.items() if k not in ("time", "student_lr")}  # noqa: E731
    resumed = [r for r in rows if "resumed_from" in r]
    assert len(resumed) == 1 and resumed[0]["resumed_from"] == tag
    body = [r for r in rows if "resumed_from" not in r]
    # rows logged after the checkpoint were cut and logged again: the same rows as the reference
    assert [(r.get("stage"), r["step"]) for r in body] == [
        (r.get("stage"), r["step"]) for r in ref_rows
    ]
    assert [r.get("student_loss") for r in body] == [r.get("student_loss") for r in ref_rows]
    assert strip(body[-1]) == strip(ref_rows[-1])
    if method == "lgtm":  # the telemetry file too: cut back to the checkpoint, then the same
        ref_infl = (tmp_path / "ref" / "influence.jsonl").read_text()
        assert (tmp_path / "job" / "influence.jsonl").read_text() == ref_infl
        assert all("influence_ratio" in r for r in body if "influence_mean" in r)
    assert len(summary["resumed_from"]) == 1
    assert [e["step"] for e in summary["evaluations"]] == [0, 3, 6]
    assert summary["best_student"] == ref_summary["best_student"]
    assert summary["wall_s"] > second.wall_before > 0


def test_unfinished_folder_without_resume_is_one_error(tmp_path, dist_env):
    tr = _trainer(tmp_path / "job", "train.max_steps=4", "output.checkpoint_every=2")
    _crash_after(tr, 3, "step")
    with pytest.raises(Crash):
        tr.train()
    with pytest.raises(ConfigError, match="unfinished run.*output.resume=auto"):
        _trainer(tmp_path / "job", "train.max_steps=4")


def test_retention_and_partial_leftovers(tmp_path, dist_env):
    job, ck = tmp_path / "job", tmp_path / "job" / "checkpoints"
    job.mkdir()
    (job / "notes.txt").write_text("mine")  # not a run output: a fresh start leaves it alone
    cmd = [
        "train.max_steps=6",
        "train.eval_every=0",
        "output.checkpoint_every=1",
        "output.keep_checkpoints=2",
        "output.resume=auto",
    ]
    first = _trainer(job, *cmd)
    _crash_after(first, 4, "step")
    with pytest.raises(Crash):
        first.train()
    assert (ck / "latest").read_text() == "step4"
    for where in (ck, ck / "teacher", ck / "student"):
        (where / "step5.partial").mkdir()  # a save killed half-way
    second = _trainer(job, *cmd)
    assert second.step == 4 and not any(ck.rglob("*.partial"))
    second.finish(second.train())
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith("step")) == ["step4", "step5"]
    for role in ("teacher", "student"):
        tags = sorted(p.name for p in (ck / role).iterdir() if p.is_dir())
        assert tags == ["step4", "step5"]  # (DeepSpeed also drops its zero_to_fp32.py there)
    assert (ck / "latest").read_text() == "step5"
    assert (job / "notes.txt").read_text() == "mine"


def _complete(ck, tag):
    return (ck / tag / "trainer_state.json").exists() and all(
        (ck / role / tag).is_dir() for role in ("teacher", "student")
    )


@pytest.mark.slow
def test_kill_9_at_random_moments_leaves_a_resumable_run(tmp_path):
    """A few trials here; `python -m tests.integration.test_resume N` runs N more and prints
    the counts."""
    counts = kill_trials(tmp_path, trials=2, seed=0)
    assert counts["resumed_ok"] == counts["trials"]


def kill_trials(tmp_path, trials: int, seed: int) -> dict:
    rng = random.Random(seed)
    counts = {"trials": 0, "resumed_ok": 0, "killed_with_latest": 0, "partial_left": 0}
    for t in range(trials):
        out = tmp_path / f"kill{t}"
        args = [
            sys.executable,
            os.path.join(ROOT, "launch", "train.py"),
            f"--output.dir={out}",
            *[f"--{o}" for o in SMALL],
            "--train.max_steps=12",
            "--train.eval_every=0",
            "--output.checkpoint_every=1",
            "--output.resume=auto",
        ]
        proc = subprocess.Popen(
            args, env=clean_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        ck = out / "checkpoints"
        deadline = time.time() + 300
        while not (ck / "latest").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))  # somewhere in the following steps and saves
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        counts["trials"] += 1
        if (ck / "latest").exists():
            counts["killed_with_latest"] += 1
            assert _complete(ck, (ck / "latest").read_text().strip())
        counts["partial_left"] += any(ck.rglob("*.partial"))
        again = subprocess.run(args, env=clean_env(), cwd=ROOT, capture_output=True, text=True)
        summary = out / "summary.json"
        if again.returncode == 0 and json.loads(summary.read_text())["steps"] == 12:
            counts["resumed_ok"] += 1
        assert not any(ck.rglob("*.partial"))
    return counts


if __name__ == "__main__":  # more kill -9 trials: python -m tests.integration.test_resume 20
    import tempfile

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    with tempfile.TemporaryDirectory() as d:
        from pathlib import Path

        print(kill_trials(Path(d), n, seed=int(time.time())))
