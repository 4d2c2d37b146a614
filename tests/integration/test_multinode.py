"""Two launcher "nodes" on localhost (a two-entry hostfile, ``--no_ssh --node_rank 0/1``), one
CPU rank each, equal the same run on one node with 2 ranks: DeepSpeed's multi-node path as a
cluster job uses it (a SLURM job runs one launcher per node the same way)."""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from ..helpers import ROOT, clean_env, free_port, run_deepspeed

pytestmark = pytest.mark.slow
ARGS = [
    "--data.synthetic_examples=400",
    "--train.micro_batch_size=8",
    "--train.max_steps=4",
    "--train.eval_every=0",
    "--model.dropout=0.1",
]


def test_two_nodes_equal_one_node_with_two_ranks(tmp_path):
    train = os.path.join(ROOT, "launch", "train.py")
    one = run_deepspeed(train, [f"--output.dir={tmp_path / 'one'}", *ARGS], 2)
    assert one.returncode == 0, one.stderr[-3000:]

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port = str(free_port())
    procs = []
    for node in (1, 0):
        cmd = [
            sys.executable, "-m", "deepspeed.launcher.runner",
            "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
            "--master_addr", "127.0.0.1", "--master_port", port,
            train, f"--output.dir={tmp_path / 'two'}", *ARGS,
        ]  # fmt: skip
        procs.append(
            subprocess.Popen(
                cmd,
                env=clean_env(),
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]

    s1 = json.loads((tmp_path / "one" / "summary.json").read_text())
    s2 = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s2["world_size"] == 2 and s2["final"] == s1["final"]
    for role in ("student", "teacher"):
        a = load_file(tmp_path / "one" / role / "model.safetensors")
        b = load_file(tmp_path / "two" / role / "model.safetensors")
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), role


def test_slurm_script_parses_and_names_resume_auto():
    script = os.path.join(ROOT, "launch", "slurm_train.sbatch")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    text = open(script).read()
    assert "--output.resume=auto" in text and "--node_rank \\$SLURM_NODEID" in text
