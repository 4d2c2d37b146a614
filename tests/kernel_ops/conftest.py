"""Fixtures for the kernel tests: backend selection and verbose float64 comparisons."""

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import torch

if importlib.util.find_spec("lgtm_kernels") is None:  # not pip-installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "kernels"))

if not torch.cuda.is_available():  # run the Triton kernels through the interpreter on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

import lgtm_kernels._backend as _backend  # noqa: E402
import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _backends():
    out = ["torch"]
    if _backend.triton_available() and (torch.cuda.is_available() or _backend.interpreter_on()):
        out.append("triton")
    return out


@pytest.fixture(params=_backends())
def backend(request, monkeypatch):
    monkeypatch.setenv("LGTM_KERNELS_BACKEND", request.param)
    return request.param


@pytest.fixture
def device():
    return DEVICE


def row_path(request, monkeypatch, backend, module: str) -> str:
    """Body of the ``path`` fixtures: 'loop' forces the online-softmax path of the Triton kernel
    in ``lgtm_kernels.<module>`` (blocks of 256, so rows span several blocks); 'single' keeps
    the launcher's sizes."""
    if request.param == "loop":
        if backend != "triton":
            pytest.skip("the loop path exists only in the Triton kernel")
        mod = importlib.import_module(f"lgtm_kernels.{module}")
        monkeypatch.setattr(mod, "MAX_FUSED_V", 256)
        monkeypatch.setattr(mod, "LOOP_BLOCK", 256)  # several blocks per row
    return request.param


def assert_close_verbose(actual, expected, tol, name=""):
    """|actual - expected| <= tol elementwise (tol broadcastable); equal infs/NaNs pass.

    On failure print the first mismatching indices with their values."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    tol = torch.as_tensor(tol, dtype=torch.float64).cpu().expand_as(expected)
    same_nonfinite = (actual == expected) | (actual.isnan() & expected.isnan())
    ok = ((actual - expected).abs() <= tol) | same_nonfinite
    if not bool(ok.all()):
        bad = (~ok).nonzero()[:8]
        lines = [f"{name}: {int((~ok).sum())} / {ok.numel()} mismatches; first:"]
        for idx in bad:
            i = tuple(idx.tolist())
            lines.append(
                f"  {i}: actual={actual[i].item():.8g} expected={expected[i].item():.8g} "
                f"tol={tol[i].item():.3g}"
            )
        raise AssertionError("\n".join(lines))
