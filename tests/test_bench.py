"""launch/bench_step.py runs each method in a child process and appends one CSV row each."""

import csv
import os
import subprocess
import sys

import pytest

from .helpers import ROOT, clean_env


@pytest.mark.slow
def test_bench_step_writes_one_row_per_method(tmp_path):
    out = tmp_path / "step.csv"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "launch", "bench_step.py"),
            "--engine",
            "torch",
            "--methods",
            "vanilla_kd,lgtm",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--batch",
            "4",
            "--seq",
            "16",
            "--csv",
            str(out),
        ],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    assert [r["method"] for r in rows] == ["vanilla_kd", "lgtm"]
    assert float(rows[0]["x_vanilla"]) == 1.0 and float(rows[1]["ms_median"]) > 0
    assert rows[1]["batch"] == "4" and rows[1]["engine"] == "torch"
    assert "lgtm" in proc.stdout.splitlines()[-2] or "lgtm" in proc.stdout
