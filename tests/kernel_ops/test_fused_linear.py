"""Chunked fused-linear KD loss and token CE vs the unchunked torch computation: loss and every
gradient, float64, odd shapes (N, V not multiples of the chunk; a fully masked chunk; a chunk
with one valid row), every divergence, row weights, a cut vocabulary, -inf vocabulary, large
logits, bf16; the Triton KD path in the interpreter; peak memory stays a fraction of one N x V
buffer (fresh process)."""

import json
import subprocess
import sys
import textwrap

import lgtm_kernels as K
import pytest
import torch
import torch.nn.functional as F

from .conftest import assert_close_verbose

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _inputs(n=37, h=11, ht=7, v=58, vt=60, dtype=torch.float64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = {
        "hidden": r(n, h),
        "weight": r(v, h) * scale / h**0.5,
        "bias": r(v) * 0.1,
        "target_hidden": r(n, ht),
        "target_weight": r(vt, ht) * scale / ht**0.5,
        "target_bias": r(vt) * 0.1,
    }
    return {k: t.to(dtype).requires_grad_(k in ("hidden", "weight", "bias")) for k, t in x.items()}


def _mask_and_weights(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, generator=g) > 0.3
    mask[8:16] = False  # a fully masked chunk (chunk 8)
    mask[16:24] = False
    mask[19] = True  # a chunk with one valid row
    weights = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    return mask, weights


def _grads(loss, x):
    keys = ("hidden", "weight", "bias")
    return loss.detach(), torch.autograd.grad(loss, [x[k] for k in keys])


def _reference_kd(x, V, **kw):
    z = F.linear(x["hidden"], x["weight"][:V], x["bias"][:V])
    zt = F.linear(x["target_hidden"], x["target_weight"][:V], x["target_bias"][:V])
    return K.kd_loss(z, zt.detach(), backend="torch", **kw)


@pytest.mark.parametrize(
    "divergence,beta,T",
    [("forward_kl", 0.5, 1.0), ("reverse_kl", 0.5, 2.0), ("jsd", 0.3, 1.5)],
)
@pytest.mark.parametrize("masked", [False, True])
def test_kd_matches_the_unchunked_computation_fp64(divergence, beta, T, masked):
    x = _inputs()
    mask, weights = _mask_and_weights(37) if masked else (None, None)
    kw = dict(temperature=T, divergence=divergence, beta=beta, mask=mask, weights=weights)
    got = _grads(K.fused_linear_kd_loss(**x, vocab_size=53, chunk_size=8, **kw), x)
    # the reference cuts the vocabulary by hand (the weight rows past 53 get no gradient)
    want_loss = _reference_kd(x, 53, **kw)
    want = _grads(want_loss, x)
    assert abs(float(got[0] - want[0])) <= 1e-12 * max(1.0, abs(float(want[0])))
    for g, w, name in zip(got[1], want[1], ("hidden", "weight", "bias")):
        assert g.shape == x[name].shape
        assert_close_verbose(g, w, 1e-12 * float(w.abs().max()) + 1e-15, name)
    assert float(got[1][1][53:].abs().max()) == 0.0  # rows past the shared vocabulary


def test_kd_global_normalizer_sum_and_t2():
    x = _inputs(n=20)
    a = K.fused_linear_kd_loss(
        **x, vocab_size=53, chunk_size=6, normalizer=50, scale_by_t2=True, temperature=2.0
    )
    b = K.fused_linear_kd_loss(
        **x, vocab_size=53, chunk_size=6, reduction="sum", scale_by_t2=True, temperature=2.0
    )
    assert torch.allclose(a * 50, b, rtol=1e-13)
    ga = torch.autograd.grad(a, x["hidden"])[0]
    gb = torch.autograd.grad(b, x["hidden"])[0]
    assert torch.allclose(ga * 50, gb, rtol=1e-12)


def test_minus_inf_vocabulary_drops_out_and_large_logits():
    x = _inputs(n=29, dtype=torch.float32, scale=300.0)  # logits of several hundred
    with torch.no_grad():
        x["bias"][[3, 17]] = float("-inf")  # vocabulary masked in both models
        x["target_bias"][[3, 17]] = float("-inf")
    got = _grads(K.fused_linear_kd_loss(**x, vocab_size=53, chunk_size=7), x)
    want = _grads(_reference_kd(x, 53), x)
    assert torch.isfinite(got[0]) and torch.allclose(got[0], want[0], rtol=1e-5)
    for g, w in zip(got[1], want[1]):
        assert torch.isfinite(g).all()
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-5 * float(w.abs().max()))


def test_bf16_within_rounding():
    x64 = _inputs(n=33)
    xb = {k: v.detach().bfloat16().requires_grad_(v.requires_grad) for k, v in x64.items()}
    got = _grads(K.fused_linear_kd_loss(**xb, vocab_size=53, chunk_size=8), xb)
    want = _grads(_reference_kd(x64, 53), x64)
    assert abs(float(got[0]) - float(want[0])) < 2e-2 * abs(float(want[0]))
    for g, w in zip(got[1], want[1]):
        cos = F.cosine_similarity(g.double().flatten(), w.flatten(), dim=0)
        assert cos > 0.995, float(cos)


def test_triton_kd_path(backend):
    """The per-chunk KD runs on the selected backend (Triton: the interpreter on CPU)."""
    x = {k: v.detach().float().requires_grad_(v.requires_grad) for k, v in _inputs(n=10).items()}
    got = _grads(K.fused_linear_kd_loss(**x, vocab_size=53, chunk_size=4, backend=backend), x)
    want = _grads(_reference_kd(x, 53), x)
    assert torch.allclose(got[0], want[0], rtol=1e-5)
    for g, w in zip(got[1], want[1]):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-6)


def test_cross_entropy_matches_the_unchunked_computation():
    x = _inputs(n=41)
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 50, (41,), generator=g)
    labels[5:10] = -100
    labels[10:15] = -100  # chunk 5: rows 10-14 all ignored
    loss = K.fused_linear_cross_entropy(x["hidden"], x["weight"], labels, x["bias"], chunk_size=5)
    got = _grads(loss, x)
    z = F.linear(x["hidden"], x["weight"], x["bias"])
    want = _grads(F.cross_entropy(z, labels, ignore_index=-100), x)
    assert abs(float(got[0] - want[0])) < 1e-12
    for a, b in zip(got[1], want[1]):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


def test_bad_shapes_are_one_clear_error():
    x = _inputs(n=5)
    with pytest.raises(ValueError, match=r"\[N, H\] and output weight \[V, H\]"):
        K.fused_linear_kd_loss(x["hidden"], x["weight"].t(), x["target_hidden"], x["target_weight"])
    with pytest.raises(ValueError, match="5 learner rows vs 4 target rows"):
        K.fused_linear_kd_loss(x["hidden"], x["weight"], x["target_hidden"][:4], x["target_weight"])
    with pytest.raises(ValueError, match="4 labels for 5 rows"):
        K.fused_linear_cross_entropy(x["hidden"], x["weight"], torch.zeros(4, dtype=torch.long))


_MEMORY_PROBE = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, "kernels")
    import lgtm_kernels as K
    torch.manual_seed(0)
    N, H, V = 2048, 64, 32000
    h = torch.randn(N, H, requires_grad=True)
    w = (torch.randn(V, H) / 8).requires_grad_()
    ht, wt = torch.randn(N, H), torch.randn(V, H) / 8
    def status(key):  # kB in /proc/self/status
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) * 1024 for x in f if x.startswith(key + ":"))
    # warm up (lazy imports, thread pools), then reset the peak (VmHWM) to the current RSS:
    # the peak of the start-up (imports) must not count
    K.fused_linear_kd_loss(h[:4], w[:64], ht[:4], wt[:64]).backward()
    h.grad = w.grad = None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    loss = K.fused_linear_kd_loss(h, w, ht, wt, chunk_size=32)
    loss.backward()
    peak = status("VmHWM")
    print(json.dumps({"growth": peak - before, "full": N * V * 4}))
    """
)


def test_peak_memory_is_a_fraction_of_one_full_logits_buffer():
    """N = 2048, V = 32000, fp32: one full N x V buffer is 262 MB (the unchunked loss holds
    several); the chunked forward + backward grows the peak RSS by less than half of one."""
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(__import__("pathlib").Path(__file__).resolve().parents[2]),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["growth"] < 0.5 * r["full"], r


@pytest.mark.parametrize("with_bias", [True, False])
def test_lgtm_teacher_grad_matches_the_unchunked_computation(with_bias):
    """Through the teacher's output layer from hidden states, chunked, vs
    lgtm_teacher_logit_grad on full logits and the layer's VJP (float64); the student's
    perturbed output layers are perturbed too."""
    g = torch.Generator().manual_seed(4)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    n, ht_dim, hs_dim, vt, vs, V = 23, 9, 6, 61, 57, 55
    teacher = (r(n, ht_dim), r(vt, ht_dim) / 3, r(vt) * 0.1 if with_bias else None)
    base = (r(n, hs_dim), r(vs, hs_dim) / 2, r(vs) * 0.1 if with_bias else None)
    dirs = [r(*x.shape) * 0.01 if x is not None else None for x in base]
    plus = tuple(x + d if x is not None else None for x, d in zip(base, dirs))
    minus = tuple(x - d if x is not None else None for x, d in zip(base, dirs))
    labels = torch.randint(0, V, (n,), generator=g)
    labels[3] = -100
    kw = dict(alpha_teacher=0.4, temperature=2.0, eta=3e-3, radius=0.01, n_rows=40)
    gh, gw, gb, infl = K.fused_linear_lgtm_teacher_grad(
        teacher, base, plus, minus, labels, vocab_size=V, chunk_size=6, **kw
    )

    def logits(h, w, b):
        return F.linear(h, w[:V], b[:V] if b is not None else None)

    dz, want_infl = K.lgtm_teacher_logit_grad(
        logits(*teacher), logits(*base), logits(*plus), logits(*minus), labels, **kw
    )
    assert torch.allclose(infl, want_infl, rtol=1e-11, atol=1e-16)
    assert torch.allclose(gh, dz @ teacher[1][:V], rtol=1e-11, atol=1e-16)
    want_w = torch.zeros_like(teacher[1])
    want_w[:V] = dz.t() @ teacher[0]
    assert torch.allclose(gw, want_w, rtol=1e-11, atol=1e-16)
    if with_bias:
        assert torch.allclose(gb[:V], dz.sum(0), rtol=1e-11, atol=1e-16)
        assert float(gb[V:].abs().max()) == 0.0
    else:
        assert gb is None


def test_default_chunk_size():
    from lgtm_kernels.fused_linear import default_chunk_size

    assert default_chunk_size(4096, 64, 32000) == 64
    assert default_chunk_size(4096, 2048, 128256) == 16
    assert default_chunk_size(5, 64, 100) == 8  # no more than the rows (a power of two)
    assert default_chunk_size(1, 64, 10**8) == 1


def test_generic_loss_and_logit_grad_match_autograd_on_full_logits():
    """``fused_linear_loss`` with a caller's row loss (reading its own chunk of another tensor)
    and ``fused_linear_logit_grad`` with a caller's logit gradient, vs autograd on the full
    logits, float64, a cut vocabulary and a chunk that does not divide N."""
    x = _inputs(n=29, v=41)
    V, chunk = 37, 6
    g = torch.Generator().manual_seed(3)
    target = torch.randn(29, V, generator=g, dtype=torch.float64)

    def row_loss(z, lo, hi):
        return ((z - target[lo:hi]) ** 2).sum() + torch.logsumexp(z, -1).sum()

    loss = K.fused_linear_loss(
        x["hidden"], x["weight"], x["bias"], row_loss, scale=0.25, vocab_size=V, chunk_size=chunk
    )
    z = F.linear(x["hidden"], x["weight"][:V], x["bias"][:V])
    ref = 0.25 * (((z - target) ** 2).sum() + torch.logsumexp(z, -1).sum())
    got, ref_ = _grads(loss, x), _grads(ref, x)
    _close(got[0], ref_[0])
    for a, b in zip(got[1], ref_[1]):
        _close(a, b)

    def logit_grad(zc, lo, hi):  # d/dz of the same objective, and a per-row extra
        dz = 2 * (zc - target[lo:hi]) + torch.softmax(zc, -1)
        return 0.25 * dz, zc.sum(-1)

    gh, gw, gb, extra = K.fused_linear_logit_grad(
        x["hidden"].detach(), x["weight"].detach(), x["bias"].detach(), logit_grad,
        vocab_size=V, chunk_size=chunk,
    )  # fmt: skip
    for a, b in zip((gh, gw, gb), ref_[1]):
        _close(a, b)
    _close(extra, z.detach().sum(-1))
    assert gw[V:].abs().max() == 0 and gb[V:].abs().max() == 0  # rows past V: no gradient


def test_logit_grad_several_gradients_in_one_pass():
    """``dz`` and ``extra`` as tuples: each gradient equals its own single-gradient pass (the
    logits computed once), each extra its own concatenation; float64, odd chunking."""
    x = _inputs(n=23, v=19)
    V, chunk = 17, 5
    h, w, b = (x[k].detach() for k in ("hidden", "weight", "bias"))
    g = torch.Generator().manual_seed(11)
    target = torch.randn(23, V, generator=g, dtype=torch.float64)
    parts = (
        lambda zc, lo, hi: torch.softmax(zc, -1) - torch.softmax(target[lo:hi], -1),
        lambda zc, lo, hi: 1e-5 * (zc - target[lo:hi]),
    )

    def both(zc, lo, hi):
        return tuple(f(zc, lo, hi) for f in parts), (zc.amax(-1), zc.sum(-1))

    gh, gw, gb, (e1, e2) = K.fused_linear_logit_grad(h, w, b, both, vocab_size=V, chunk_size=chunk)
    assert len(gh) == len(gw) == len(gb) == 2
    for i, f in enumerate(parts):
        ref = K.fused_linear_logit_grad(
            h, w, b, lambda zc, lo, hi, f=f: (f(zc, lo, hi), None), vocab_size=V, chunk_size=7
        )
        for a, r in zip((gh[i], gw[i], gb[i]), ref[:3]):
            _close(a, r)
        assert ref[3] is None
    z = F.linear(h, w[:V], b[:V])
    _close(e1, z.amax(-1))
    _close(e2, z.sum(-1))
    # no rows: zeros of the single-gradient shape
    gh0, gw0, gb0, e0 = K.fused_linear_logit_grad(h[:0], w, b, both, vocab_size=V)
    assert gh0.shape == (0, h.shape[1]) and gw0.abs().max() == 0 and e0 is None


def _close(a, b, rel=1e-12):
    assert_close_verbose(a, b, rel * float(b.detach().abs().max()) + 1e-300)
