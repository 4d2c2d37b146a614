"""launch/bench_step.py runs each method in a child process and appends one CSV row each.

The runs (trainer, ranks, processes); the in-process tests:
``tests/unit/test_bench.py``."""

import csv
import os
import subprocess
import sys

import pytest

from ..helpers import ROOT, clean_env


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
            "vanilla_kd,lgtm,naive",  # naive: the reference form (the GPU check's 3x target)
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
    assert [r["method"] for r in rows] == ["vanilla_kd", "lgtm", "naive"]
    assert float(rows[0]["x_vanilla"]) == 1.0 and float(rows[1]["ms_median"]) > 0
    assert rows[1]["batch"] == "4" and rows[1]["engine"] == "torch"
    assert "lgtm" in proc.stdout.splitlines()[-2] or "lgtm" in proc.stdout


@pytest.mark.slow
def test_bench_step_runs_two_ranks_and_reports_the_largest_growth(tmp_path):
    """``--ranks 2``: one process per rank (gloo on CPU), DeepSpeed ZeRO-3 engines; one row per
    method with ``ranks`` = 2 and the memory growth in student copies."""
    out = tmp_path / "step.csv"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "launch", "bench_step.py"),
            *("--preset", "decoder-cpu", "--ranks", "2", "--methods", "online_kd"),
            *("--ds_config", os.path.join(ROOT, "ds_configs", "zero3.json")),
            *("--steps", "1", "--warmup", "1", "--batch", "2", "--seq", "16", "--csv", str(out)),
        ],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (row,) = list(csv.DictReader(out.open()))
    assert row["ranks"] == "2" and row["zero_stage"] == "3/3" and row["method"] == "online_kd"
    assert float(row["x_student"]) == float(row["x_student"])  # a number (not NaN)
    assert "2 rank(s), ZeRO 3/3" in proc.stdout


@pytest.mark.slow
def test_bench_memory_writes_one_row_per_case(tmp_path):
    """launch/bench_memory.py at toy size: the six cases in order, the LoRA cases train fewer
    parameters, the ratios are numbers."""
    pytest.importorskip("peft")
    out = tmp_path / "memory.csv"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "launch", "bench_memory.py"),
            *("--preset", "decoder-mem", "--batch", "2", "--seq", "16", "--vocab", "64"),
            *("--steps", "1", "--warmup", "1", "--csv", str(out)),
        ],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    assert [(r["method"], r["peft"]) for r in rows] == [
        ("vanilla_kd", "none"),
        ("lgtm", "teacher"),
        ("lgtm", "none"),
        ("lgtm", "both"),
        ("lgtm", "teacher"),
        ("online_kd", "none"),
    ]
    frozen, lora_t, full, both, ckpt, _ = rows
    assert ckpt["teacher_checkpointing"] == "1" and lora_t["teacher_checkpointing"] == "0"
    assert float(frozen["x_frozen"]) == 1.0 and float(full["total_mib"]) > 0
    assert int(lora_t["trainable_teacher"]) < int(full["trainable_teacher"])
    assert lora_t["trainable_student"] == full["trainable_student"]
    assert int(both["trainable_student"]) < int(full["trainable_student"])
    assert float(lora_t["x_online_kd"]) > 0 and full["x_online_kd"] == ""
    assert "LoRA teacher / online KD" in proc.stdout
