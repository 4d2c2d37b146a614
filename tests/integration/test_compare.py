"""launch/compare.py: every method x seed as its own run, tables from the runs' summaries,
the learning-curve PNG, and a second invocation that reuses finished runs."""

import csv
import json
import os
import re
import subprocess
import sys

import pytest

from ..helpers import ROOT, clean_env

pytestmark = pytest.mark.slow


def _compare(out, *extra):
    return subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "launch", "compare.py"),
            "--methods=online_kd,lgtm",
            "--seeds=2",
            f"--out={out}",
            "--data.synthetic_examples=400",
            "--train.micro_batch_size=8",
            "--train.max_steps",  # the "--key value" form too
            "3",
            "--train.eval_every=2",
            *extra,
        ],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )


def test_compare_runs_methods_and_seeds_then_reuses_them(tmp_path):
    out = tmp_path / "cmp"
    proc = _compare(out)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    runs = list(csv.DictReader(open(out / "runs.csv")))
    assert [(r["method"], r["seed"]) for r in runs] == [
        ("online_kd", "42"),
        ("online_kd", "43"),
        ("lgtm", "42"),
        ("lgtm", "43"),
    ]
    for r in runs:
        s = json.loads((out / r["method"] / f"seed{r['seed']}" / "summary.json").read_text())
        assert s["method"] == r["method"] and float(r["best_student"]) == s["best_student"]
        assert float(r["peak_memory_mb"]) > 0 and float(r["steps_per_s"]) > 0
    table = {t["method"]: t for t in csv.DictReader(open(out / "table.csv"))}
    for m in ("online_kd", "lgtm"):
        vals = [float(r["final_student"]) for r in runs if r["method"] == m]
        mean = sum(vals) / 2
        std = (sum((v - mean) ** 2 for v in vals)) ** 0.5  # sample std, n = 2
        assert float(table[m]["final_student"]) == pytest.approx(mean)
        assert float(table[m]["final_student_std"]) == pytest.approx(std)
        assert table[m]["completed"] == "2"
    assert "| lgtm | 2/2 |" in (out / "table.md").read_text()
    try:
        import matplotlib  # noqa: F401

        assert (out / "curves.png").stat().st_size > 1000
    except ImportError:
        pass
    again = _compare(out)
    assert again.returncode == 0
    assert again.stdout.count("done before") == 4 and "running" not in again.stdout


def test_compare_bad_input_is_one_error(tmp_path):
    proc = _compare(tmp_path / "x", "--methods=lgtm,nope")
    assert proc.returncode == 2 and "nope" in proc.stderr and "Traceback" not in proc.stderr
    proc = _compare(tmp_path / "x", "--train.seed=3")
    assert proc.returncode == 2 and "--train.seed is set by compare.py" in proc.stderr
    proc = _compare(tmp_path / "x", "--train.bogus=1")
    assert proc.returncode == 2 and "train.bogus" in proc.stderr
    proc = _compare(tmp_path / "x", "--launcher=no-such-launcher --num_gpus 2")
    assert proc.returncode == 2 and "no such command" in proc.stderr
    proc = _compare(tmp_path / "x", "--launcher=deepspeed 'x")
    assert proc.returncode == 2 and "cannot split it" in proc.stderr
    (tmp_path / "file").write_text("")
    proc = _compare(tmp_path / "file")
    assert proc.returncode == 2 and "cannot create the folder" in proc.stderr
    assert "Traceback" not in proc.stderr
    for variant, says in (
        ("nope", "expected NAME=OVERRIDES"),
        ("lgtm=--method.influence_scale=2", "taken by another row"),
        ("x=--train.seed=3", "--variant 'x': --train.seed is set by compare.py"),
        ("x=--method.bogus=1", "--variant 'x': "),
        ("x=method.name=lgtm", "unexpected argument 'method.name=lgtm'"),
        ("x=--train.best_metric=accuracy", "train.best_metric differs"),
        ('x=--method.name="lgtm', "cannot split"),  # an unbalanced quote
    ):
        proc = _compare(tmp_path / "x", "--variant", variant)
        assert proc.returncode == 2 and says in proc.stderr, (variant, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert not any((tmp_path / "x").glob("*/seed*"))  # nothing ran


def test_compare_variant_is_a_row_with_its_own_overrides(tmp_path):
    out = tmp_path / "v"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", "compare.py"), "--seeds=1", f"--out={out}",
         "--variant", "lgtm_x10=--method.name=lgtm --method.influence_scale 10",
         "--data.synthetic_examples=400", "--train.micro_batch_size=8", "--train.max_steps=2",
         "--train.eval_every=0"],
        env=clean_env(), capture_output=True, text=True, timeout=900, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    runs = list(csv.DictReader(open(out / "runs.csv")))
    assert [(r["method"], r["seed"]) for r in runs] == [("lgtm_x10", "42")]
    run = out / "lgtm_x10" / "seed42"
    assert json.loads((run / "summary.json").read_text())["method"] == "lgtm"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["influence_scale"] for r in rows if "influence_scale" in r} == {10.0}
    assert "| lgtm_x10 | 1/1 |" in (out / "table.md").read_text()


def test_compare_jobs_runs_two_at_a_time(tmp_path):
    """--jobs 2: both runs overlap in time (each on its own port), the tables as usual; a
    custom launcher runs one at a time."""
    out = tmp_path / "cmp"
    proc = _compare(out, "--jobs=2", "--methods=student_only")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    # both runs were started before either finished (timestamps of the runs' own metric rows are
    # no proof either way: a 3-step run can finish inside the other's start-up)
    lines = proc.stdout.splitlines()
    started = [i for i, x in enumerate(lines) if x.endswith("run.log)") and ": running (" in x]
    ended = [i for i, x in enumerate(lines) if re.search(r": completed in \d+ s$", x)]
    assert len(started) == 2 and len(ended) == 2 and max(started) < min(ended), proc.stdout
    for seed in (42, 43):
        s = json.loads((out / "student_only" / f"seed{seed}" / "summary.json").read_text())
        assert s.get("status", "completed") == "completed"
    assert "| student_only | 2/2 |" in (out / "table.md").read_text()
    bad = _compare(tmp_path / "x", "--jobs=2", "--launcher=deepspeed --num_gpus 1")
    assert bad.returncode == 2 and "1 with --launcher" in bad.stderr
