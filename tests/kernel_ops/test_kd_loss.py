"""kd_loss vs an independent float64 reference, both backends (triton runs in the interpreter on
CPU), odd shapes, +-1e4 logits, -inf entries, masked rows, all divergences and reductions."""

import math
import os
import zlib

import lgtm_kernels
import pytest
import torch
import torch.nn.functional as F
from lgtm_kernels import _backend

from .conftest import assert_close_verbose, row_path

NEG = float("-inf")
# numpy warnings from the Triton interpreter on -inf arithmetic that the kernels mask out
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


# ---------------------------------------------------------------- float64 reference (independent)
def ref64(s, t, *, T, div, beta=0.5, w=None, m=None, reduction="batchmean", t2=False):
    """Returns (reduced loss, d reduced / d row loss [n], d reduced / d s) in float64."""
    a, b = s.double() / T, t.double() / T
    n = a.shape[0]
    row_ok = (a.amax(-1) > NEG) & (b.amax(-1) > NEG)
    a_ = torch.where(row_ok[:, None], a, 0.0)
    b_ = torch.where(row_ok[:, None], b, 0.0)
    la, lb = F.log_softmax(a_, -1), F.log_softmax(b_, -1)
    la = torch.where(a == NEG, NEG, la)
    lb = torch.where(b == NEG, NEG, lb)
    p, q = lb.exp(), la.exp()
    if div == "jsd" and beta == 0.0:
        div = "forward_kl"
    if div == "jsd" and beta == 1.0:
        div = "reverse_kl"

    def kl(x, lx, ly, y_inf):  # sum x (lx - ly), 0 log 0 = 0, x log(x/0) = inf
        x_pos = lx > NEG
        term = torch.where(x_pos, x * (lx - torch.where(y_inf & x_pos, 0.0, ly)), 0.0)
        term = torch.where(x_pos & y_inf, math.inf, term)
        return term.sum(-1)

    if div == "forward_kl":
        loss = kl(p, lb, la, a == NEG)
        grad = (q - p) / T
    elif div == "reverse_kl":
        loss = kl(q, la, lb, b == NEG)
        grad = torch.where(la > NEG, q * (la - lb - loss[:, None]), 0.0) / T
    else:
        mix = beta * p + (1 - beta) * q
        lm = torch.log(mix)
        loss = beta * kl(p, lb, lm, mix == 0) + (1 - beta) * kl(q, la, lm, mix == 0)
        gq = torch.where(q > 0, (1 - beta) * (la - lm), 0.0)
        grad = q * (gq - (q * gq).sum(-1, keepdim=True)) / T
    keep = row_ok if m is None else row_ok & m
    wr = torch.ones(n, dtype=torch.float64, device=s.device) if w is None else w.double()
    if t2:
        wr = wr * T * T
    rows = torch.where(keep, wr * loss, 0.0)
    denom = 1.0
    if reduction == "batchmean":
        denom = float(max(int(m.sum()) if m is not None else n, 1))
    rowf = torch.where(keep, wr / denom, 0.0)  # d reduced / d row loss
    grad = torch.where(keep[:, None], grad * rowf[:, None], 0.0)
    if reduction == "none":
        return rows, rowf, grad
    return rows.sum() / denom, rowf, grad


def naive(s, t, *, T, div, beta=0.5):
    """Plain torch eager in the input dtype (unweighted, summed rows): the rounding-error scale
    for tolerances, flash-attention style."""
    s = s.detach().clone().requires_grad_(True)
    ls, lt = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
    if div == "forward_kl" or (div == "jsd" and beta == 0):
        rows = F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1)
    elif div == "reverse_kl" or (div == "jsd" and beta == 1):
        rows = F.kl_div(lt, ls, reduction="none", log_target=True).sum(-1)
    else:
        lm = torch.logsumexp(torch.stack([ls + math.log(1 - beta), lt + math.log(beta)]), 0)
        rows = beta * F.kl_div(lm, lt, reduction="none", log_target=True).sum(-1) + (
            1 - beta
        ) * F.kl_div(lm, ls, reduction="none", log_target=True).sum(-1)
    rows.sum().backward()
    return s.grad


def run(s, t, **kw):
    x = s.detach().clone().requires_grad_(True)
    out = lgtm_kernels.kd_loss(x, t, **kw)
    g = (
        torch.randn(out.shape, device=out.device)
        if out.dim()
        else torch.tensor(1.7, device=out.device)
    )
    (out * g).sum().backward()
    return out.detach(), x.grad, g.double()


def check(s, t, *, T, div, beta=0.5, w=None, m=None, reduction="batchmean", t2=False, name=""):
    out, grad, g = run(
        s,
        t,
        temperature=T,
        divergence=div,
        beta=beta,
        weights=w,
        mask=m,
        reduction=reduction,
        scale_by_t2=t2,
    )
    ref, rowf, rgrad = ref64(s, t, T=T, div=div, beta=beta, w=w, m=m, reduction=reduction, t2=t2)
    rowf = (rowf * g)[:, None]
    rgrad = rgrad * (g[:, None] if reduction == "none" else g)
    assert_close_verbose(out, ref, 1e-5 + 2e-5 * ref.abs(), f"{name} loss")
    assert grad.dtype == s.dtype
    # flash-attention style: twice the error of plain torch eager in the same dtype (its unit
    # gradient, error scaled by the row factors) plus a small absolute term; for bf16 one more
    # ulp (the interpreter truncates fp32 -> bf16 instead of rounding)
    _, _, unit = ref64(s, t, T=T, div=div, beta=beta, reduction="sum")
    err = (naive(s, t, T=T, div=div, beta=beta).double() - unit).abs().nan_to_num(0.0)
    # + 1e-4 of the largest entry: fp32 cancellation in q (gq - S) where gq ~ S (JSD, reverse KL)
    tol = 2 * err * rowf.abs() + 2e-4 * rgrad.abs().amax(-1, keepdim=True).clamp_min(1e-9)
    if s.dtype == torch.float32:
        tol = tol + 1e-5 * rgrad.abs()
    elif s.dtype == torch.float16:
        tol = tol + 2**-10 * rgrad.abs()
    else:
        tol = tol + 2**-7 * rgrad.abs()
    assert_close_verbose(grad, rgrad, tol, f"{name} grad")


def rand(shape, dtype, scale=3.0):
    x = torch.randn(shape) * scale
    x = torch.where(x == 0, 0.5, x)  # never zeros
    return x.to(dtype)


@pytest.fixture(params=["single", "loop"])
def path(request, monkeypatch, backend):
    """'loop' forces the online-softmax path of the Triton kernel (row longer than a block)."""
    return row_path(request, monkeypatch, backend, "_kd_triton")


DIVS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("div,beta", DIVS, ids=[f"{d}-{b}" for d, b in DIVS])
@pytest.mark.parametrize("T", [0.5, 1.0, 4.0])
def test_kd_random(backend, path, dtype, div, beta, T):
    if path == "loop" and T != 1.0:
        pytest.skip("the loop path is exercised at T=1 (temperature is handled identically)")
    torch.manual_seed(zlib.crc32(f"{div}{beta}{T}{dtype}".encode()))
    n, V = 7, 1001
    s, t = rand((n, V), dtype), rand((n, V), dtype)
    name = f"{backend}/{path}/{dtype}/{div}/{beta}/T{T}"
    check(s, t, T=T, div=div, beta=beta, reduction="sum", name=name + "/sum")
    w = torch.rand(n) + 0.5
    m = torch.rand(n) > 0.3
    m[0] = False
    for red in ("batchmean", "sum", "none"):
        check(
            s,
            t,
            T=T,
            div=div,
            beta=beta,
            w=w,
            m=m,
            reduction=red,
            t2=red == "none",
            name=f"{name}/{red}",
        )


@pytest.mark.parametrize("div,beta", DIVS[:3], ids=[d for d, _ in DIVS[:3]])
def test_kd_large_magnitude(backend, path, div, beta):
    torch.manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        s = rand((5, 777), dtype, 1e4).clamp(-1e4, 1e4)
        t = rand((5, 777), dtype, 1e4).clamp(-1e4, 1e4)
        t[1] = s[1]  # identical rows: loss exactly ~0
        for T in (0.5, 4.0):
            check(s, t, T=T, div=div, beta=beta, reduction="sum", name=f"{dtype}/{div}/T{T}")


@pytest.mark.parametrize("div,beta", DIVS[:3], ids=[d for d, _ in DIVS[:3]])
def test_kd_neg_inf(backend, path, div, beta):
    torch.manual_seed(2)
    n, V = 6, 523
    s, t = rand((n, V), torch.float32), rand((n, V), torch.float32)
    both = torch.rand(n, V) < 0.3  # masked vocabulary in both inputs
    s[both] = NEG
    t[both] = NEG
    s[4] = NEG  # a row that is all -inf counts as masked
    t[5] = NEG
    check(s, t, T=1.0, div=div, beta=beta, name="both")
    # one-sided: -inf only where the divergence stays finite
    s2, t2 = s.clone(), t.clone()
    only = torch.rand(n, V) < 0.2
    if div == "forward_kl":
        t2[only] = NEG  # teacher excludes tokens the student still scores
    elif div == "reverse_kl":
        s2[only] = NEG
    else:
        t2[only] = NEG
        s2[torch.rand(n, V) < 0.2] = NEG
    for dtype in (torch.float32, torch.bfloat16):
        check(
            s2.to(dtype),
            t2.to(dtype),
            T=2.0,
            div=div,
            beta=beta,
            w=torch.rand(n) + 0.1,
            reduction="sum",
            name=f"one-sided/{dtype}",
        )


def test_kd_infinite_loss(backend, path):
    """Forward KL is +inf where the teacher has mass on a student -inf; the gradient is finite."""
    s, t = rand((3, 300), torch.float32), rand((3, 300), torch.float32)
    s[1, 7] = NEG
    out, grad, _ = run(s, t, reduction="none")
    assert math.isinf(out[1].item()) and out[0].isfinite() and out[2].isfinite()
    _, _, rgrad = ref64(s, t, T=1.0, div="forward_kl", reduction="none")
    assert grad.isfinite().all()
    out2, _, _ = run(t, s, divergence="reverse_kl", reduction="none")
    assert math.isinf(out2[1].item()) and out2[0].isfinite()


def test_kd_fully_masked(backend, path):
    s, t = rand((4, 300), torch.bfloat16), rand((4, 300), torch.bfloat16)
    m = torch.zeros(4, dtype=torch.bool)
    for red in ("batchmean", "sum", "none"):
        out, grad, _ = run(s, t, mask=m, reduction=red)
        assert (out == 0).all() and (grad == 0).all()


def test_kd_jsd_limits_and_shapes(backend, path):
    """beta=0 / 1 are forward / reverse KL (TRL, Liger); [..., V] inputs; non-contiguous rows."""
    torch.manual_seed(3)
    s, t = rand((2, 3, 257), torch.float32), rand((2, 3, 257), torch.float32)
    for beta, div in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        a = lgtm_kernels.kd_loss(s, t, divergence="jsd", beta=beta)
        b = lgtm_kernels.kd_loss(s, t, divergence=div)
        assert torch.equal(a, b)
    big = rand((6, 600), torch.float32)
    check(big[:, :257], t.reshape(6, 257), T=1.0, div="jsd", name="strided")


@pytest.mark.parametrize("div,beta", [("forward_kl", 0.5), ("jsd", 0.3)])
def test_kd_fp16(backend, path, div, beta):
    torch.manual_seed(6)
    s, t = rand((5, 411), torch.float16), rand((5, 411), torch.float16)
    m = torch.tensor([True, False, True, True, True])
    check(s, t, T=2.0, div=div, beta=beta, m=m, reduction="batchmean", name=f"fp16/{div}")


def test_kd_inplace_grad(backend, path):
    torch.manual_seed(4)
    s, t = rand((5, 333), torch.bfloat16), rand((5, 333), torch.bfloat16)
    x = s.clone().requires_grad_(True)
    lgtm_kernels.kd_loss(x, t, temperature=2.0).backward()
    y = s.clone().requires_grad_(True)
    loss = lgtm_kernels.kd_loss(y, t, temperature=2.0, inplace_grad=True)
    loss.backward()
    assert torch.equal(x.grad, y.grad)
    assert y.grad.data_ptr() == y.data_ptr()


def test_kd_grad_matches_autograd_float64():
    """The analytic gradients of the float64 reference equal autograd of the plain formulas."""
    torch.manual_seed(5)
    s, t = torch.randn(4, 50, dtype=torch.float64), torch.randn(4, 50, dtype=torch.float64)
    for div, beta in DIVS:
        x = s.clone().requires_grad_(True)
        lq, lp = F.log_softmax(x / 2, -1), F.log_softmax(t / 2, -1)
        q, p = lq.exp(), lp.exp()
        if div == "forward_kl":
            loss = (p * (lp - lq)).sum()
        elif div == "reverse_kl":
            loss = (q * (lq - lp)).sum()
        else:
            lm = torch.log(beta * p + (1 - beta) * q)
            loss = (beta * p * (lp - lm) + (1 - beta) * q * (lq - lm)).sum()
        loss.backward()
        ref, _, grad = ref64(s, t, T=2.0, div=div, beta=beta, reduction="sum")
        assert torch.allclose(ref, loss.detach(), rtol=1e-12, atol=1e-12)
        assert torch.allclose(grad, x.grad, rtol=1e-10, atol=1e-12)


def test_backend_env(monkeypatch):
    monkeypatch.setenv("LGTM_KERNELS_BACKEND", "torch")
    assert _backend.backend_for(torch.ones(1)) == "torch"
    monkeypatch.setenv("LGTM_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError):
        _backend.backend_for(torch.ones(1))
    monkeypatch.delenv("LGTM_KERNELS_BACKEND")
    assert _backend.backend_for(torch.ones(1)) == "torch"  # CPU tensors default to torch
    assert _backend.backend_for(torch.ones(1), choice="auto") == "torch"
    with pytest.raises(ValueError):
        _backend.backend_for(torch.ones(1), choice="bogus")


def test_kd_loss_ref_leaves_environment(monkeypatch):
    """kd_loss_ref / backend= take the torch path without reading or writing the variable."""
    monkeypatch.setenv("LGTM_KERNELS_BACKEND", "bogus")  # kd_loss would raise on it
    before = dict(os.environ)
    s, t = torch.randn(4, 37, dtype=torch.float64), torch.randn(4, 37, dtype=torch.float64)
    x = s.clone().requires_grad_(True)
    loss = lgtm_kernels.kd_loss_ref(x, t, temperature=2.0, divergence="jsd")
    loss.backward()
    assert dict(os.environ) == before
    ref, _, grad = ref64(s, t, T=2.0, div="jsd")
    assert torch.allclose(loss.double(), ref, rtol=1e-6, atol=1e-9)
    assert torch.allclose(x.grad.double(), grad, rtol=1e-6, atol=1e-9)
    y = lgtm_kernels.kd_loss(s, t, temperature=2.0, divergence="jsd", backend="torch")
    assert torch.equal(y, loss.detach())
    with pytest.raises(ValueError):
        lgtm_kernels.kd_loss(s, t)  # the variable is still "bogus" for the default path
    with pytest.raises(ValueError):
        lgtm_kernels.kd_loss(s, t, backend="bogus")


def test_import_without_triton():
    """`import lgtm_kernels` and the torch path work when triton cannot be imported."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys\n"
        "sys.modules['triton'] = None  # any `import triton` now raises ImportError\n"
        "import torch, lgtm_kernels as K\n"
        "assert not K.triton_available()\n"
        "x = torch.randn(3, 50, requires_grad=True)\n"
        "K.kd_loss(x, torch.randn(3, 50)).backward()\n"
        "p = [torch.randn(5)]\n"
        "K.perturb_(p, [torch.randn(5)], 0.1)\n"
        "print('ok')\n"
    )
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[2] / "kernels"), "PATH": "/usr/bin"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.stdout.strip() == "ok", r.stderr[-2000:]


@pytest.mark.parametrize("where", ["student", "teacher"])
def test_kd_nan_row_is_not_hidden(backend, path, where):
    """A NaN logit (a diverged model) makes its row's loss and gradient NaN, never the 0 of a
    masked row: the divergence guard must see it. The other rows are unaffected."""
    s, t = rand((3, 300), torch.float32), rand((3, 300), torch.float32)
    (s if where == "student" else t)[1, 11] = float("nan")
    out, grad, _ = run(s, t, reduction="none")
    assert math.isnan(out[1].item()) and out[0].isfinite() and out[2].isfinite()
    assert grad[1].isnan().any() and grad[0].isfinite().all() and grad[2].isfinite().all()
    mean, _, _ = run(s, t, reduction="batchmean")
    assert math.isnan(mean.item())


@pytest.mark.parametrize("div,beta", DIVS)
def test_kd_float64_is_computed_in_float64(backend, div, beta):
    """float64 inputs stay float64 (torch path, whatever the backend setting): agreement with
    the float64 reference at 1e-12, where fp32 arithmetic would be ~1e-7 off."""
    n, V = 5, 77
    s, t = rand((n, V), torch.float64), rand((n, V), torch.float64)
    w, m = torch.rand(n, dtype=torch.float64) + 0.1, torch.tensor([1, 1, 0, 1, 1]).bool()
    for reduction in ("batchmean", "none"):
        out, grad, g = run(
            s,
            t,
            temperature=1.7,
            divergence=div,
            beta=beta,
            weights=w,
            mask=m,
            reduction=reduction,
        )
        ref, _, rgrad = ref64(s, t, T=1.7, div=div, beta=beta, w=w, m=m, reduction=reduction)
        rgrad = rgrad * (g[:, None] if reduction == "none" else g)
        assert out.dtype == grad.dtype == torch.float64
        assert float((out - ref).abs().max()) <= 1e-12 * float(ref.abs().max())
        assert float((grad - rgrad).abs().max()) <= 1e-12 * float(rgrad.abs().max())
