"""The same checks at full size on a CUDA device (skipped without one): run
``python -m pytest -q -m gpu tests/kernel_ops`` on the GPU machine (``launch/bench_kernels.py
--check`` does this before benchmarking)."""

import lgtm_kernels
import pytest
import torch
import torch.nn.functional as F

from .conftest import assert_close_verbose
from .test_kd_loss import check
from .test_lgtm_grad import definition64

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("V", [32000, 128256, 151936])
@pytest.mark.parametrize("div,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5)])
def test_kd_full_size(backend, V, div, beta):
    torch.manual_seed(V)
    n = 256
    for dtype in (torch.bfloat16, torch.float32):
        s = (torch.randn(n, V, device="cuda") * 3).to(dtype)
        t = (torch.randn(n, V, device="cuda") * 3).to(dtype)
        t[:, -7:] = float("-inf")
        s[:, -7:] = float("-inf")
        m = torch.rand(n, device="cuda") > 0.2
        w = torch.rand(n, device="cuda") + 0.5
        check(
            s,
            t,
            T=2.0,
            div=div,
            beta=beta,
            w=w,
            m=m,
            reduction="batchmean",
            name=f"{backend}/{V}/{dtype}/{div}",
        )


def test_kd_backends_agree_bf16(monkeypatch):
    """kernel = torch fallback at the benchmark shape (bf16 gradients within one ulp)."""
    torch.manual_seed(0)
    s = (torch.randn(8192, 32000, device="cuda") * 3).bfloat16()
    t = (torch.randn(8192, 32000, device="cuda") * 3).bfloat16()
    out = {}
    for be in ("triton", "torch"):
        monkeypatch.setenv("LGTM_KERNELS_BACKEND", be)
        x = s.clone().requires_grad_(True)
        loss = lgtm_kernels.kd_loss(x, t, temperature=2.0)
        loss.backward()
        out[be] = (loss.detach(), x.grad)
    assert torch.allclose(out["triton"][0], out["torch"][0], rtol=1e-5)
    g1, g2 = out["triton"][1].float(), out["torch"][1].float()
    assert_close_verbose(g1, g2, 2.0**-7 * g2.abs() + 1e-9, "grad")


@pytest.mark.parametrize("V", [32000, 128256])
def test_lgtm_grad_full_size(backend, V):
    torch.manual_seed(1)
    n, R = 64, 0.05
    z = (torch.randn(n, V, device="cuda") * 2).bfloat16()
    s = torch.randn(n, V, device="cuda") * 2
    v = torch.randn(n, V, device="cuda")
    sp, sm = (s + R * v).bfloat16(), (s - R * v).bfloat16()
    s = s.bfloat16()
    y = torch.randint(0, V, (n,), device="cuda")
    y[3] = -100
    G, I_ref = definition64(z, s, sp, sm, y, a_t=0.4, T=2.0, eta=0.03, R=R, n=n)
    g, infl = lgtm_kernels.lgtm_teacher_logit_grad(
        z, s, sp, sm, y, alpha_teacher=0.4, temperature=2.0, eta=0.03, radius=R
    )
    assert_close_verbose(g, G, 1e-4 * G.abs().amax() + (1e-4 + 2.0**-7) * G.abs(), "dL/dz")
    assert F.cosine_similarity(infl.double(), I_ref, dim=0) > 0.9999


def llama_like(n_layers=2, device="cuda", dtype=torch.bfloat16):
    shapes = [(128256, 2048)]
    for _ in range(n_layers):
        shapes += [
            (2048, 2048),
            (512, 2048),
            (512, 2048),
            (2048, 2048),
            (8192, 2048),
            (8192, 2048),
            (2048, 8192),
            (2048,),
            (2048,),
        ]
    shapes.append((2048,))
    return [torch.randn(s, device=device).to(dtype) for s in shapes]


def test_perturb_norm_full_size(backend):
    torch.manual_seed(2)
    for vdt in (torch.bfloat16, torch.float32):
        p = llama_like()
        v = [torch.randn_like(x, dtype=vdt) for x in p]
        ref = [x.double() + 1e-3 * y.double() for x, y in zip(p, v, strict=True)]
        lgtm_kernels.perturb_(p, v, 1e-3)
        for i, (x, r) in enumerate(zip(p, ref, strict=True)):
            assert_close_verbose(x, r, 2.0**-7 * r.abs() + 1e-30, f"perturb {i}")
        got = lgtm_kernels.global_sq_norm(v)
        want = sum((y.double() ** 2).sum() for y in v)
        assert abs(got.double() - want) <= 1e-5 * want
        flat = torch.cat([y.reshape(-1) for y in v])
        assert abs(lgtm_kernels.global_sq_norm(flat).double() - want) <= 1e-5 * want


def test_adamw_lookahead_full_size(backend):
    torch.manual_seed(3)
    params = [x.float() for x in llama_like(n_layers=1)]
    grads = [torch.randn_like(x) for x in params]
    m = [0.1 * torch.randn_like(x) for x in params]
    v = [0.01 * torch.rand_like(x) + 1e-4 for x in params]
    real = [torch.nn.Parameter(x.clone()) for x in params]
    opt = torch.optim.AdamW(real, lr=1e-3, weight_decay=0.1)
    for p, g, a, b in zip(real, grads, m, v, strict=True):
        p.grad = g.clone()
        opt.state[p] = {"step": torch.tensor(9.0), "exp_avg": a.clone(), "exp_avg_sq": b.clone()}
    m0 = [a.clone() for a in m]
    lgtm_kernels.adamw_lookahead_(
        params, grads, m, v, step=10, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1
    )
    opt.step()
    for i, (x, r) in enumerate(zip(params, real, strict=True)):
        assert_close_verbose(x, r.detach(), 1e-6 * r.detach().abs() + 1e-7, f"adamw {i}")
    assert all(torch.equal(a, b) for a, b in zip(m, m0, strict=True))
