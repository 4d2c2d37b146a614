"""perturb_ / global_sq_norm / adamw_lookahead_ vs float64 and vs a real torch.optim.AdamW step,
for lists of odd-sized tensors with bf16 / fp32 mixes, with and without fp32 sources."""

import copy

import lgtm_kernels
import pytest
import torch

from .conftest import assert_close_verbose

SHAPES = [(7, 13), (1,), (300,), (5, 5, 5), (0,), (129,), (3, 67)]


@pytest.fixture(autouse=True)
def small_blocks(backend, monkeypatch):
    """Blocks of 64 elements so that several tensors span several blocks in the interpreter."""
    if backend == "triton" and not torch.cuda.is_available():
        from lgtm_kernels import _multi_tensor_triton

        monkeypatch.setattr(_multi_tensor_triton, "BLOCK", 64)


def rand_list(dtypes, device, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, s in enumerate(SHAPES):
        x = torch.randn(s, generator=g) * scale
        x = torch.where(x == 0, 0.25, x)
        out.append(x.to(device=device, dtype=dtypes[i % len(dtypes)]))
    return out


def ulp_tol(dtype, ref):
    # one ulp of the destination dtype (round-to-nearest in torch, truncation in the interpreter)
    if dtype == torch.bfloat16:
        return 2.0**-7 * ref.abs() + 1e-30
    return 2.0**-22 * ref.abs() + 1e-30


MIXES = {
    "bf16/bf16": ([torch.bfloat16], [torch.bfloat16]),
    "bf16/fp32": ([torch.bfloat16], [torch.float32]),
    "fp32/bf16": ([torch.float32], [torch.bfloat16]),
    "mixed": ([torch.bfloat16, torch.float32], [torch.float32, torch.bfloat16, torch.float32]),
}


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("with_source", [False, True], ids=["inplace", "source"])
@pytest.mark.parametrize("alpha_kind", ["float", "tensor"])
def test_perturb(backend, device, mix, with_source, alpha_kind):
    pd, vd = MIXES[mix]
    params = rand_list(pd, device, seed=1)
    direction = rand_list(vd, device, scale=1e-2, seed=2)
    source = rand_list([torch.float32], device, seed=3) if with_source else None
    src = source if with_source else params
    base = [s.double() for s in src]
    alpha = 0.37
    a = torch.tensor(alpha, device=device) if alpha_kind == "tensor" else alpha
    lgtm_kernels.perturb_(params, direction, a, source=source)
    for i, (p, b, v) in enumerate(zip(params, base, direction, strict=True)):
        ref = b + alpha * v.double()
        assert p.dtype == pd[i % len(pd)]
        assert_close_verbose(p, ref, ulp_tol(p.dtype, ref), f"tensor {i}")


def test_perturb_restore_bitwise(backend, device):
    """p = source + 0 * v restores bf16 params bitwise from fp32 masters; +R v / -R v from the
    masters sees the full step even when R v is below half a bf16 ulp."""
    masters = rand_list([torch.float32], device, scale=0.02, seed=4)
    keep = [m.clone() for m in masters]
    params = [m.to(torch.bfloat16) for m in masters]
    v = rand_list([torch.float32], device, scale=1.0, seed=5)
    lgtm_kernels.perturb_(params, v, 0.0, source=masters)  # what a restore writes
    saved = [p.clone() for p in params]
    lgtm_kernels.perturb_(params, v, 1e-5, source=masters)
    lgtm_kernels.perturb_(params, v, 0.0, source=masters)
    for p, s in zip(params, saved, strict=True):
        assert torch.equal(p, s)
    for m, k in zip(masters, keep, strict=True):
        assert torch.equal(m, k)  # the sources are read only


@pytest.mark.parametrize("mix", ["bf16", "fp32", "mixed"])
def test_global_sq_norm(backend, device, mix):
    dt = {
        "bf16": [torch.bfloat16],
        "fp32": [torch.float32],
        "mixed": [torch.bfloat16, torch.float32],
    }
    xs = rand_list(dt[mix], device, scale=3.0, seed=6)
    got = lgtm_kernels.global_sq_norm(xs)
    ref = sum((x.double() ** 2).sum() for x in xs)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert_close_verbose(got, ref, 1e-5 * ref, "sq norm")
    assert lgtm_kernels.global_sq_norm(xs[0]).item() == pytest.approx(
        (xs[0].double() ** 2).sum().item(), rel=1e-5
    )  # a flat buffer on its own


def _adam_setup(device, pdtype, seed):
    params = rand_list([pdtype], device, seed=seed)
    params = [p for p in params if p.numel()]  # AdamW skips nothing, but keep it simple
    grads = [torch.randn_like(p, dtype=torch.float32) for p in params]
    exp_avg = [0.1 * torch.randn_like(g) for g in grads]
    exp_avg_sq = [0.01 * torch.rand_like(g) + 1e-4 for g in grads]
    return params, grads, exp_avg, exp_avg_sq


HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)


@pytest.mark.parametrize("with_source", [False, True], ids=["inplace", "source"])
def test_adamw_lookahead_equals_real_step(backend, device, with_source):
    """fp32 params: the look-ahead equals the params after a real AdamW step (state step 4 ->
    step 5), and the moments are unchanged."""
    params, grads, m, v = _adam_setup(device, torch.float32, 7)
    real = [torch.nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.AdamW(
        real,
        lr=HP["lr"],
        betas=(HP["beta1"], HP["beta2"]),
        eps=HP["eps"],
        weight_decay=HP["weight_decay"],
        foreach=False,
    )
    for p, g, ea, es in zip(real, grads, m, v, strict=True):
        p.grad = g.clone()
        opt.state[p] = {"step": torch.tensor(4.0), "exp_avg": ea.clone(), "exp_avg_sq": es.clone()}
    m0, v0 = copy.deepcopy(m), copy.deepcopy(v)
    source = None
    if with_source:  # look-ahead from fp32 masters into bf16 working params
        source = [p.clone() for p in params]
        params = [p.to(torch.bfloat16) for p in params]
    lgtm_kernels.adamw_lookahead_(params, grads, m, v, step=5, source=source, **HP)
    opt.step()
    for i, (p, r) in enumerate(zip(params, real, strict=True)):
        ref = r.detach()
        if with_source:
            ref = ref.to(torch.bfloat16).double()
            assert_close_verbose(p, ref, 2.0**-7 * ref.abs(), f"param {i}")
        else:
            assert_close_verbose(p, ref, 1e-6 * ref.abs() + 1e-7, f"param {i}")
    for a, b in zip(m + v, m0 + v0, strict=True):
        assert torch.equal(a, b)


def test_adamw_lookahead_float64(backend, device):
    """bf16 params, bf16 grads: fp32 math rounded once, vs the float64 formula."""
    params, grads, m, v = _adam_setup(device, torch.bfloat16, 8)
    grads = [g.to(torch.bfloat16) for g in grads]
    p0 = [p.double() for p in params]
    lgtm_kernels.adamw_lookahead_(params, grads, m, v, step=3, **HP)
    b1, b2, lr = HP["beta1"], HP["beta2"], HP["lr"]
    for i, (p, x, g, ea, es) in enumerate(zip(params, p0, grads, m, v, strict=True)):
        g = g.double()
        m2 = b1 * ea.double() + (1 - b1) * g
        v2 = b2 * es.double() + (1 - b2) * g * g
        den = v2.sqrt() / (1 - b2**3) ** 0.5 + HP["eps"]
        ref = x * (1 - lr * HP["weight_decay"]) - lr / (1 - b1**3) * m2 / den
        assert_close_verbose(p, ref, 2.0**-7 * ref.abs() + 1e-6, f"param {i}")
