"""Triton kernel for the LGTM teacher logit gradient (docs/algorithm.md, "The form LGTM-DS
computes", Eq. (8)) and the per-row distillation influence, in one fused pass over the row.

Layer 1: ``_lgtm_grad_kernel`` (one program per row); layer 2: ``lgtm_grad_triton``.
Bytes per element: read z, s, s+, s- (4 x input), write dL/dz: 5 x 2 B in bf16 when the row is
held on chip (V <= MAX_FUSED_V); longer rows take one online-statistics pass first
(+4 reads, mostly from L2 for rows just read).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# four input rows held in registers: 16384 spills ~0.45 KiB/thread on sm_90, 4096 (16 warps)
# none (`python -m lgtm_kernels._compile_check`)
MAX_FUSED_V = 4096
LOOP_BLOCK = 2048


@triton.jit
def _online(m, s, x):
    """Online max / sum-exp update of one row statistic with a block x (fp32, -inf allowed)."""
    n = tl.maximum(m, tl.max(x, 0))
    n0 = tl.where(n > float("-inf"), n, 0.0)
    s = s * tl.exp(m - n0) + tl.sum(tl.exp(x - n0), 0)
    return n, s


@triton.jit
def _lgtm_block(z, s, sp, sm, cols, y, mzt, lzt, mz, lz, ms, ls, mp, lp, mn, ln, inv_T, c1, c2, c3):
    """dL/dz for one block and the block's share of sum_c pT_c (log q-_c - log q+_c)."""
    zt = z * inv_T
    pt = tl.exp((zt - mzt) - lzt)  # softmax(z / T)
    p1 = tl.exp((z - mz) - lz)  # softmax(z)
    q = tl.exp((s * inv_T - ms) - ls)
    lqp = (sp * inv_T - mp) - lp
    lqm = (sm * inv_T - mn) - ln
    onehot = tl.where(cols == y, 1.0, 0.0)
    g = c1 * (pt - q) + c2 * (p1 - onehot) + c3 * (tl.exp(lqp) - tl.exp(lqm))
    d = tl.where(z == float("-inf"), 0.0, pt * (lqm - lqp))
    return g, d


@triton.jit
def _lgtm_grad_kernel(
    z_ptr,  # [N, V] teacher logits (fp32 / bf16 / fp16), row stride z_stride
    s_ptr,  # [N, V] student logits at theta, row stride s_stride
    sp_ptr,  # [N, V] student logits at theta + R v, row stride sp_stride
    sm_ptr,  # [N, V] student logits at theta - R v, row stride sm_stride
    y_ptr,  # [N] int64 labels, < 0 = ignore (no CE term)
    g_ptr,  # [N, V] out: dL/dz, dtype of z, contiguous
    inf_ptr,  # [N] fp32 out: influence -eta (l+ - l-) / (2 R)
    coef_ptr,  # [4] fp32: a_t / (T n), (1 - a_t) / n, eta a_t / (2 R T n), -eta / (2 R)
    z_stride,
    s_stride,
    sp_stride,
    sm_stride,
    V,
    inv_T,
    SINGLE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    NEG: tl.constexpr = float("-inf")
    offs = tl.arange(0, BLOCK)
    z_row = z_ptr + row * z_stride
    s_row = s_ptr + row * s_stride
    sp_row = sp_ptr + row * sp_stride
    sm_row = sm_ptr + row * sm_stride
    g_row = g_ptr + row * V
    y = tl.load(y_ptr + row)
    c1 = tl.load(coef_ptr)
    c2 = tl.where(y >= 0, tl.load(coef_ptr + 1), 0.0)
    c3 = tl.load(coef_ptr + 2)
    c4 = tl.load(coef_ptr + 3)
    if SINGLE:
        ld = offs < V
        z = tl.load(z_row + offs, mask=ld, other=NEG).to(tl.float32)
        s = tl.load(s_row + offs, mask=ld, other=NEG).to(tl.float32)
        sp = tl.load(sp_row + offs, mask=ld, other=NEG).to(tl.float32)
        sm = tl.load(sm_row + offs, mask=ld, other=NEG).to(tl.float32)
        mzt = tl.max(z * inv_T, 0)
        mz = tl.max(z, 0)
        ms = tl.max(s * inv_T, 0)
        mp = tl.max(sp * inv_T, 0)
        mn = tl.max(sm * inv_T, 0)
        lzt = tl.log(tl.sum(tl.exp(z * inv_T - mzt), 0))
        lz = tl.log(tl.sum(tl.exp(z - mz), 0))
        ls = tl.log(tl.sum(tl.exp(s * inv_T - ms), 0))
        lp = tl.log(tl.sum(tl.exp(sp * inv_T - mp), 0))
        ln = tl.log(tl.sum(tl.exp(sm * inv_T - mn), 0))
        g, d = _lgtm_block(
            z, s, sp, sm, offs, y, mzt, lzt, mz, lz, ms, ls, mp, lp, mn, ln, inv_T, c1, c2, c3
        )
        tl.store(g_row + offs, g.to(g_ptr.dtype.element_ty), mask=ld)
        diff = tl.sum(tl.where(ld, d, 0.0), 0)
    else:
        mzt = tl.full([], NEG, tl.float32)
        mz = tl.full([], NEG, tl.float32)
        ms = tl.full([], NEG, tl.float32)
        mp = tl.full([], NEG, tl.float32)
        mn = tl.full([], NEG, tl.float32)
        szt = tl.full([], 0.0, tl.float32)
        sz = tl.full([], 0.0, tl.float32)
        ss = tl.full([], 0.0, tl.float32)
        sp_ = tl.full([], 0.0, tl.float32)
        sn = tl.full([], 0.0, tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + offs
            ld = cols < V
            z = tl.load(z_row + cols, mask=ld, other=NEG).to(tl.float32)
            mzt, szt = _online(mzt, szt, z * inv_T)
            mz, sz = _online(mz, sz, z)
            s = tl.load(s_row + cols, mask=ld, other=NEG).to(tl.float32)
            ms, ss = _online(ms, ss, s * inv_T)
            sp = tl.load(sp_row + cols, mask=ld, other=NEG).to(tl.float32)
            mp, sp_ = _online(mp, sp_, sp * inv_T)
            sm = tl.load(sm_row + cols, mask=ld, other=NEG).to(tl.float32)
            mn, sn = _online(mn, sn, sm * inv_T)
        lzt = tl.log(szt)
        lz = tl.log(sz)
        ls = tl.log(ss)
        lp = tl.log(sp_)
        ln = tl.log(sn)
        diff = tl.full([], 0.0, tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + offs
            ld = cols < V
            z = tl.load(z_row + cols, mask=ld, other=NEG).to(tl.float32)
            s = tl.load(s_row + cols, mask=ld, other=NEG).to(tl.float32)
            sp = tl.load(sp_row + cols, mask=ld, other=NEG).to(tl.float32)
            sm = tl.load(sm_row + cols, mask=ld, other=NEG).to(tl.float32)
            g, d = _lgtm_block(
                z, s, sp, sm, cols, y, mzt, lzt, mz, lz, ms, ls, mp, lp, mn, ln, inv_T, c1, c2, c3
            )
            tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=ld)
            diff += tl.sum(tl.where(ld, d, 0.0), 0)
    # l+ - l- = sum_c pT_c (log q-_c - log q+_c)
    tl.store(inf_ptr + row, c4 * diff)


def _warps(block: int) -> int:
    return 16 if block >= 4096 else (8 if block >= 2048 else 4)


def lgtm_grad_triton(z, s, sp, sm, y, coef, inv_T):
    N, V = z.shape
    g = torch.empty((N, V), dtype=z.dtype, device=z.device)
    infl = torch.empty(N, dtype=torch.float32, device=z.device)
    if N == 0:
        return g, infl
    block = triton.next_power_of_2(V)
    single = block <= MAX_FUSED_V
    if not single:
        block = LOOP_BLOCK
    _lgtm_grad_kernel[(N,)](
        z,
        s,
        sp,
        sm,
        y,
        g,
        infl,
        coef,
        z.stride(0),
        s.stride(0),
        sp.stride(0),
        sm.stride(0),
        V,
        inv_T,
        SINGLE=single,
        BLOCK=block,
        num_warps=_warps(block),
    )
    return g, infl
