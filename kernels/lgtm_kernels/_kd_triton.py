"""Triton kernels for the fused KD loss (softmax of both inputs + divergence + gradient).

Layer 1: ``_kd_fwd_kernel`` (one program per row). Layer 2: ``kd_rows_triton`` (launcher).
Layer 3 (autograd) lives in ``kd_loss.py`` and is shared with the torch path.

Bytes per element of the [N, V] inputs (bf16 s and t, bf16 gradient; floor = 6 B):
  * V <= MAX_FUSED_V (row held on chip): read s, read t, write grad          -> 6 B  (1.0x)
  * larger V, forward KL: pass 1 stats (4 B), pass 2 loss + grad (6 B)        -> 10 B (1.67x)
  * larger V, reverse KL / JSD: stats, loss + row sum, grad                   -> 14 B (2.33x)
Without a gradient (eval) the last pass is dropped. Re-reads of a row by the same program come
mostly from L2 when the rows in flight fit in it, so DRAM traffic sits between these and 6 B.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Largest row kept in registers in one block. 32768 would need 64 fp32 registers per thread for
# the two rows alone at 1024 threads: sm_90 compiles it with ~0.7 KiB/thread of stack spills,
# 16384 with 32 warps spills 80 B (checked with `python -m lgtm_kernels._compile_check`).
MAX_FUSED_V = 16384
# Block width of the looped (online-softmax) path for longer rows: 16 warps, ~58 registers, no
# spills, two CTAs per SM; the second pass re-reads a row just read, mostly from L2 for
# V = 32000 (264 rows in flight x 64 KiB < 50 MiB), less so for V = 128256.
LOOP_BLOCK = 4096

DIV_CODES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}


@triton.jit
def _kd_elem(a, b, la, lb, beta, DIV: tl.constexpr):
    """Per-element loss term and d(term)/d(log q) weight ``gq`` (reverse KL, JSD).

    a, b: student / teacher logits over T (fp32, -inf allowed); la, lb: their log-softmax.
    Conventions: 0 * log 0 = 0; p * log(p / 0) = +inf for p > 0.
    """
    p = tl.exp(lb)
    q = tl.exp(la)
    if DIV == 0:  # KL(P || Q)
        term = tl.where(
            b == float("-inf"), 0.0, tl.where(a == float("-inf"), float("inf"), p * (lb - la))
        )
        gq = term  # unused
    elif DIV == 1:  # KL(Q || P)
        gq = tl.where(a == float("-inf"), 0.0, tl.where(b == float("-inf"), float("inf"), la - lb))
        term = tl.where(a == float("-inf"), 0.0, q * gq)
    else:  # generalized JSD, M = beta P + (1 - beta) Q
        mix = beta * p + (1.0 - beta) * q
        lm = tl.log(mix)
        gq = tl.where((q > 0.0) & (mix > 0.0), (1.0 - beta) * (la - lm), 0.0)
        term = tl.where((p > 0.0) & (mix > 0.0), beta * p * (lb - lm), 0.0) + q * gq
    return term, gq


@triton.jit
def _kd_elem_grad(la, lb, gq, S, inv_T, DIV: tl.constexpr):
    """d(row loss)/d(student logit), unscaled by weights."""
    q = tl.exp(la)
    if DIV == 0:
        g = (q - tl.exp(lb)) * inv_T
    else:
        g = tl.where(q > 0.0, q * (gq - S), 0.0) * inv_T
    return g


@triton.jit
def _kd_fwd_kernel(
    s_ptr,  # [N, V] student logits (fp32 / bf16 / fp16), row stride s_stride, unit column stride
    t_ptr,  # [N, V] teacher logits (any float dtype), row stride t_stride
    g_ptr,  # [N, V] gradient out, dtype of s; may alias s_ptr (inplace_grad); if COMPUTE_GRAD
    loss_ptr,  # [N] fp32 out: scale * w_i * l_i, 0 for masked / all -inf rows
    w_ptr,  # [N] fp32 row weights (read only if HAS_W)
    m_ptr,  # [N] uint8 view of the bool row mask, 1 = keep (read only if HAS_MASK)
    gscale_ptr,  # [1] fp32 gradient scale (1 / number of valid rows for batchmean, else 1)
    s_stride,
    t_stride,
    g_stride,
    V,
    inv_T,
    beta,
    lscale,  # T^2 or 1
    DIV: tl.constexpr,  # 0 forward KL, 1 reverse KL, 2 JSD
    HAS_W: tl.constexpr,
    HAS_MASK: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    SINGLE: tl.constexpr,  # BLOCK >= V: the whole row is held in registers
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    g_row = g_ptr + row * g_stride
    offs = tl.arange(0, BLOCK)
    valid = True
    if HAS_MASK:
        valid = tl.load(m_ptr + row).to(tl.int32) != 0
    w = lscale
    if HAS_W:
        w = w * tl.load(w_ptr + row).to(tl.float32)
    gs = w * tl.load(gscale_ptr)
    NEG: tl.constexpr = float("-inf")
    # masked rows read nothing; loads keep the plain `cols < V` mask (a row-dependent bound
    # would hide V's divisibility by 16 and turn 128-bit accesses into 16-bit ones)

    if valid:
        if SINGLE:
            ld = offs < V
            a = tl.load(s_row + offs, mask=ld, other=NEG).to(tl.float32) * inv_T
            b = tl.load(t_row + offs, mask=ld, other=NEG).to(tl.float32) * inv_T
            ma = tl.max(a, 0)
            mb = tl.max(b, 0)
            ok = valid & (ma != NEG) & (mb != NEG)  # NaN rows stay in: NaN out
            ma = tl.where(ma > NEG, ma, 0.0)
            mb = tl.where(mb > NEG, mb, 0.0)
            la = (a - ma) - tl.log(tl.sum(tl.exp(a - ma), 0))
            lb = (b - mb) - tl.log(tl.sum(tl.exp(b - mb), 0))
            term, gq = _kd_elem(a, b, la, lb, beta, DIV)
            term = tl.where(offs < V, term, 0.0)
            loss = tl.sum(term, 0)
            tl.store(loss_ptr + row, tl.where(ok, w * loss, 0.0))
            if COMPUTE_GRAD:
                S = loss
                if DIV == 2:
                    S = tl.sum(tl.where(offs < V, tl.exp(la) * gq, 0.0), 0)
                g = _kd_elem_grad(la, lb, gq, S, inv_T, DIV)
                g = tl.where(ok, g * gs, 0.0)
                tl.store(g_row + offs, g.to(g_ptr.dtype.element_ty), mask=offs < V)
        else:
            # pass 1: online max / sum-exp of both rows
            ma = tl.full([], NEG, tl.float32)
            mb = tl.full([], NEG, tl.float32)
            sa = tl.full([], 0.0, tl.float32)
            sb = tl.full([], 0.0, tl.float32)
            for start in range(0, V, BLOCK):
                cols = start + offs
                ld = cols < V
                a = tl.load(s_row + cols, mask=ld, other=NEG).to(tl.float32) * inv_T
                b = tl.load(t_row + cols, mask=ld, other=NEG).to(tl.float32) * inv_T
                na = tl.maximum(ma, tl.max(a, 0))
                nb = tl.maximum(mb, tl.max(b, 0))
                na0 = tl.where(na > NEG, na, 0.0)
                nb0 = tl.where(nb > NEG, nb, 0.0)
                sa = sa * tl.exp(ma - na0) + tl.sum(tl.exp(a - na0), 0)
                sb = sb * tl.exp(mb - nb0) + tl.sum(tl.exp(b - nb0), 0)
                ma = na
                mb = nb
            ok = valid & (ma != NEG) & (mb != NEG)  # NaN rows stay in: NaN out
            ma = tl.where(ma > NEG, ma, 0.0)
            mb = tl.where(mb > NEG, mb, 0.0)
            lsa = tl.log(sa)
            lsb = tl.log(sb)
            # pass 2: loss (reverse KL / JSD: also S = sum_c q_c gq_c for the gradient)
            loss = tl.full([], 0.0, tl.float32)
            S = tl.full([], 0.0, tl.float32)  # sum_c q_c gq_c (= loss for reverse KL)
            if (DIV != 0) or (not COMPUTE_GRAD):
                for start in range(0, V, BLOCK):
                    cols = start + offs
                    ld = cols < V
                    a = tl.load(s_row + cols, mask=ld, other=NEG).to(tl.float32) * inv_T
                    b = tl.load(t_row + cols, mask=ld, other=NEG).to(tl.float32) * inv_T
                    term, gq = _kd_elem(a, b, (a - ma) - lsa, (b - mb) - lsb, beta, DIV)
                    loss += tl.sum(tl.where(cols < V, term, 0.0), 0)
                    if DIV == 2:
                        S += tl.sum(tl.where(cols < V, tl.exp((a - ma) - lsa) * gq, 0.0), 0)
            if DIV == 1:
                S = loss
            # pass 3: gradient (forward KL accumulates its loss here)
            if COMPUTE_GRAD:
                for start in range(0, V, BLOCK):
                    cols = start + offs
                    ld = cols < V
                    a = tl.load(s_row + cols, mask=ld, other=NEG).to(tl.float32) * inv_T
                    b = tl.load(t_row + cols, mask=ld, other=NEG).to(tl.float32) * inv_T
                    la = (a - ma) - lsa
                    lb = (b - mb) - lsb
                    term, gq = _kd_elem(a, b, la, lb, beta, DIV)
                    if DIV == 0:
                        loss += tl.sum(tl.where(cols < V, term, 0.0), 0)
                    g = _kd_elem_grad(la, lb, gq, S, inv_T, DIV)
                    g = tl.where(ok, g * gs, 0.0)
                    tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=cols < V)
            tl.store(loss_ptr + row, tl.where(ok, w * loss, 0.0))

    else:
        tl.store(loss_ptr + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, V, BLOCK):
                cols = start + offs
                zero = tl.zeros([BLOCK], dtype=g_ptr.dtype.element_ty)
                tl.store(g_row + cols, zero, mask=cols < V)


def _warps(block: int) -> int:
    if block >= 16384:
        return 32
    if block >= 4096:
        return 16
    if block >= 2048:
        return 8
    return 4


def kd_rows_triton(
    s: torch.Tensor,  # [N, V], unit column stride
    t: torch.Tensor,  # [N, V]
    *,
    div: str,
    inv_T: float,
    beta: float,
    lscale: float,
    weights: torch.Tensor | None,  # [N] fp32
    mask: torch.Tensor | None,  # [N] bool
    gscale: torch.Tensor,  # [1] fp32
    compute_grad: bool,
    grad_out: torch.Tensor | None,  # [N, V] buffer (may be s itself)
) -> tuple[torch.Tensor, torch.Tensor | None]:
    N, V = s.shape
    loss = torch.empty(N, dtype=torch.float32, device=s.device)
    block = triton.next_power_of_2(V)
    single = block <= MAX_FUSED_V
    if not single:
        block = LOOP_BLOCK
    g = grad_out if compute_grad else s
    if N == 0:
        return loss, (g if compute_grad else None)
    _kd_fwd_kernel[(N,)](
        s,
        t,
        g,
        loss,
        weights if weights is not None else loss,
        mask.view(torch.uint8) if mask is not None else loss,  # bool loads: uint8 view
        gscale,
        s.stride(0),
        t.stride(0),
        g.stride(0),
        V,
        inv_T,
        beta,
        lscale,
        DIV=DIV_CODES[div],
        HAS_W=weights is not None,
        HAS_MASK=mask is not None,
        COMPUTE_GRAD=compute_grad,
        SINGLE=single,
        BLOCK=block,
        num_warps=_warps(block),
    )
    return loss, (g if compute_grad else None)
