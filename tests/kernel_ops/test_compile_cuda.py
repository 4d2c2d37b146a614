"""Every kernel configuration the launchers use compiles for sm_90 (H100) without a GPU, with
128-bit accesses where the addresses allow them (catches what the interpreter cannot)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

KERNELS = str(Path(__file__).resolve().parents[2] / "kernels")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_compile_for_sm90():
    env = dict(os.environ, TRITON_INTERPRET="0")
    env["PYTHONPATH"] = KERNELS + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run(
        [sys.executable, "-m", "lgtm_kernels._compile_check", "--arch", "90"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    out = r.stdout
    if "No module named 'triton.backends.nvidia'" in r.stderr:
        pytest.skip("triton without the NVIDIA backend")
    assert r.returncode == 0, out + r.stderr[-3000:]
    lines = [ln for ln in out.splitlines() if ln.startswith("ok")]
    assert len(lines) >= 20, out
    for ln in lines:  # aligned multi-tensor kernels and the KD kernel must vectorise
        if "aligned=False" not in ln:
            assert "vector_ld_st=0" not in ln, ln
