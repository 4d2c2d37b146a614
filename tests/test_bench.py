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


@pytest.mark.parametrize(
    "name,billions,tied", [("llama-1b", 1.236, True), ("llama-125m", 0.1305, True)]
)
def test_gpu_decoder_preset_models_have_the_documented_size(name, billions, tied):
    """The decoder-1b preset (GPU issue): a Llama-3.2-1B-shaped 1.24B teacher and a ~0.13B
    student at V = 128256 with 1024 positions (built on the meta device: no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    from lgtm_ds.tasks import hf
    from lgtm_ds.tasks.base import ModelOptions
    from lgtm_ds.tools.bench_step import PRESETS

    assert PRESETS["decoder-1b"][1:] == (
        "embedded:llama-1b",
        "embedded:llama-125m",
        8,
        1024,
        128256,
    )
    cfg = hf.embedded_decoder_config(
        name, options=ModelOptions(vocab_size=128256), max_position=1024
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    n = sum(p.numel() for p in model.parameters()) / 1e9
    assert n == pytest.approx(billions, rel=1e-3) and cfg.tie_word_embeddings == tied
    assert cfg.max_position_embeddings == 1024


@pytest.mark.slow
def test_influence_precision_tool_reports_the_cosines(capsys):
    """``launch/influence_precision.py`` (a GPU-check step) on one tiny step: it records the
    term through the task's step-D call (0.8 moved step D to ``lgtm_teacher_pass``, and the tool
    recorded nothing until 0.9) and LGTM-DS's bf16 influence term tracks float64."""
    import re

    from lgtm_ds.tools.influence_precision import main

    assert main(["--steps", "1", "--batch", "8", "--warm_steps", "0"]) == 0
    out = capsys.readouterr().out
    got = re.search(r"fp32 work tensors\)\s+cosine vs fp64: influence term ([0-9.]+)", out)
    assert got, out
    assert float(got.group(1)) >= 0.99
