"""Triton kernels over a *list* of tensors in one launch: perturbation, squared norm, AdamW
look-ahead.

Each launch gets device-side tables (int64 element offsets from the role's first tensor, one
per tensor and role) plus the cumulative block count per tensor; program ``pid`` finds its
tensor by a binary search over that table (log2(#tensors) scalar loads, L2-resident), then
streams one BLOCK of it. Full blocks use unmasked accesses (the per-tensor length is a loaded
value, so a masked access could not be vectorised); only a tensor's last block is masked.
Tensors must be contiguous. Element types come from a "type witness" pointer argument (the
first tensor of each role).

Bytes per element (the floor): perturb p += a v: read p, read v, write p; with ``source``:
read source, read v, write p; sq-norm: read once; AdamW look-ahead: read p|source, g, m, v,
write p.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096
NUM_WARPS = 8
_TABLES: dict = {}  # (addresses, numels, BLOCK) -> device tables; addresses fully define them


@triton.jit
def _locate(bstart_ptr, pid, LOG_T: tl.constexpr, N_T):
    """Index i of the tensor owning block pid: bstart[i] <= pid < bstart[i + 1]."""
    lo = pid * 0
    hi = lo + N_T
    for _ in tl.static_range(LOG_T):
        mid = (lo + hi) // 2
        go = tl.load(bstart_ptr + mid) <= pid
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    return lo


@triton.jit
def _block(bstart_ptr, numel_ptr, N_T, LOG_T: tl.constexpr, BLOCK: tl.constexpr):
    """This program's share of the list: (pid, tensor index i, first element ``start`` of the
    block within tensor i, numel n of tensor i, element offsets start + [0, BLOCK))."""
    pid = tl.program_id(0).to(tl.int64)
    i = _locate(bstart_ptr, pid, LOG_T, N_T)
    start = (pid - tl.load(bstart_ptr + i)) * BLOCK
    n = tl.load(numel_ptr + i)
    offs = start + tl.arange(0, BLOCK)
    return pid, i, start, n, offs


@triton.jit
def _ptr(tab_ptr, i, witness, ALIGNED: tl.constexpr):
    """Pointer to tensor i of a role: the witness (the role's first tensor, a kernel argument that
    Triton knows to be 16-byte aligned) plus a loaded element offset. Casting a loaded address to
    a pointer instead would lose all alignment facts and force scalar 2-byte accesses."""
    off = tl.load(tab_ptr + i)
    if ALIGNED:  # every address is 64-byte aligned (checked on the host): 128-bit accesses
        off = tl.multiple_of(off, 16)
    return witness + off


@triton.jit
def _perturb_kernel(
    p_tab,  # [T] int64 element offsets of the params from p_w (dtype of p_w), written in place
    v_tab,  # [T] int64 element offsets of the directions from v_w, same numel as the params
    s_tab,  # [T] int64 element offsets of the sources from s_w, read only if HAS_SRC
    numel_ptr,  # [T] int64 element counts
    bstart_ptr,  # [T + 1] int64 cumulative block counts
    alpha_ptr,  # [1] fp32 step (read if ALPHA_PTR, else alpha_val)
    alpha_val,
    p_w,  # type witness: first param
    v_w,  # type witness: first direction
    s_w,  # type witness: first source (or p_w)
    N_T,
    HAS_SRC: tl.constexpr,
    ALPHA_PTR: tl.constexpr,
    ALIGNED: tl.constexpr,
    LOG_T: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid, i, start, n, offs = _block(bstart_ptr, numel_ptr, N_T, LOG_T, BLOCK)
    p = _ptr(p_tab, i, p_w, ALIGNED) + offs
    v = _ptr(v_tab, i, v_w, ALIGNED) + offs
    src = p
    if HAS_SRC:
        src = _ptr(s_tab, i, s_w, ALIGNED) + offs
    if ALPHA_PTR:
        alpha = tl.load(alpha_ptr)
    else:
        alpha = alpha_val
    if start + BLOCK <= n:
        x = tl.load(src).to(tl.float32) + alpha * tl.load(v).to(tl.float32)
        tl.store(p, x.to(p_w.dtype.element_ty))
    else:
        m = offs < n
        x = tl.load(src, mask=m).to(tl.float32) + alpha * tl.load(v, mask=m).to(tl.float32)
        tl.store(p, x.to(p_w.dtype.element_ty), mask=m)


@triton.jit
def _sq_norm_kernel(
    x_tab,  # [T] int64 element offsets of the tensors from x_w (dtype of x_w)
    numel_ptr,  # [T] int64
    bstart_ptr,  # [T + 1] int64
    out_ptr,  # [n_blocks] fp32 per-block partial sums of squares
    x_w,
    N_T,
    ALIGNED: tl.constexpr,
    LOG_T: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid, i, start, n, offs = _block(bstart_ptr, numel_ptr, N_T, LOG_T, BLOCK)
    x = _ptr(x_tab, i, x_w, ALIGNED) + offs
    if start + BLOCK <= n:
        v = tl.load(x).to(tl.float32)
    else:
        v = tl.load(x, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(v * v, 0))


@triton.jit
def _adamw_lookahead_kernel(
    p_tab,  # [T] int64 element offsets from p_w of the params (dtype of p_w), written
    g_tab,  # [T] int64 offsets from g_w of the grads
    m_tab,  # [T] int64 offsets from m_w of exp_avg, read only
    v_tab,  # [T] int64 offsets from v_w of exp_avg_sq, read only
    s_tab,  # [T] int64 offsets from s_w of the sources, read if HAS_SRC
    numel_ptr,  # [T] int64
    bstart_ptr,  # [T + 1] int64
    p_w,
    g_w,
    m_w,
    v_w,
    s_w,
    N_T,
    decay,  # 1 - lr * weight_decay
    beta1,
    beta2,
    step_size,  # lr / (1 - beta1^t)
    bc2_sqrt,  # sqrt(1 - beta2^t)
    eps,
    HAS_SRC: tl.constexpr,
    ALIGNED: tl.constexpr,
    LOG_T: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid, i, start, n, offs = _block(bstart_ptr, numel_ptr, N_T, LOG_T, BLOCK)
    msk = offs < n
    p = _ptr(p_tab, i, p_w, ALIGNED) + offs
    src = p
    if HAS_SRC:
        src = _ptr(s_tab, i, s_w, ALIGNED) + offs
    g = _ptr(g_tab, i, g_w, ALIGNED) + offs
    m = _ptr(m_tab, i, m_w, ALIGNED) + offs
    v = _ptr(v_tab, i, v_w, ALIGNED) + offs
    if start + BLOCK <= n:
        x = tl.load(src).to(tl.float32)
        gv = tl.load(g).to(tl.float32)
        mv = tl.load(m).to(tl.float32)
        vv = tl.load(v).to(tl.float32)
    else:
        x = tl.load(src, mask=msk).to(tl.float32)
        gv = tl.load(g, mask=msk).to(tl.float32)
        mv = tl.load(m, mask=msk).to(tl.float32)
        vv = tl.load(v, mask=msk).to(tl.float32)
    # torch.optim.AdamW (_single_tensor_adamw) order: decay, lerp, addcmul, sqrt/bc2 + eps, addcdiv
    x = x * decay
    mv = mv + (1.0 - beta1) * (gv - mv)
    vv = vv * beta2 + (1.0 - beta2) * (gv * gv)
    denom = tl.sqrt(vv) / bc2_sqrt + eps
    x = x - step_size * (mv / denom)
    if start + BLOCK <= n:
        tl.store(p, x.to(p_w.dtype.element_ty))
    else:
        tl.store(p, x.to(p_w.dtype.element_ty), mask=msk)


def _tables(groups: list[list[torch.Tensor]]):
    """Device tables for aligned lists of tensors: one address table per role, numel, bstart."""
    first = groups[0]
    key = (
        tuple(tuple(t.data_ptr() for t in g) for g in groups),
        tuple(g[0].dtype for g in groups),
        tuple(t.numel() for t in first),
        BLOCK,
    )
    hit = _TABLES.get(key)
    if hit is not None:
        return hit
    dev = first[0].device
    numels = [t.numel() for t in first]
    bstart = [0]
    for n in numels:
        bstart.append(bstart[-1] + triton.cdiv(n, BLOCK))
    # element offsets of every tensor from its role's first tensor (the "witness" argument)
    addr = torch.tensor(
        [[(t.data_ptr() - g[0].data_ptr()) // t.element_size() for t in g] for g in groups],
        dtype=torch.int64,
    )
    for g in groups:
        for t in g:
            if (t.data_ptr() - g[0].data_ptr()) % t.element_size():
                raise ValueError("tensors of one role must have element-aligned addresses")
    # allocator blocks are 512-byte aligned; views into flat buffers may start anywhere
    aligned = all(t.data_ptr() % 64 == 0 for g in groups for t in g)
    out = (
        addr.to(dev),
        torch.tensor(numels, dtype=torch.int64).to(dev),
        torch.tensor(bstart, dtype=torch.int64).to(dev),
        bstart[-1],
        aligned,
        max(1, (len(first)).bit_length()),
    )
    if len(_TABLES) > 64:
        _TABLES.clear()
    _TABLES[key] = out
    return out


def perturb_triton(params, direction, alpha, source=None) -> None:
    roles = [params, direction] + ([source] if source is not None else [])
    addr, numel, bstart, nblk, aligned, log_t = _tables(roles)
    if nblk == 0:
        return
    a_ptr = alpha if isinstance(alpha, torch.Tensor) else numel
    src_tab = addr[2] if source is not None else addr[0]
    _perturb_kernel[(nblk,)](
        addr[0],
        addr[1],
        src_tab,
        numel,
        bstart,
        a_ptr,
        0.0 if isinstance(alpha, torch.Tensor) else float(alpha),
        params[0],
        direction[0],
        (source or params)[0],
        len(params),
        HAS_SRC=source is not None,
        ALPHA_PTR=isinstance(alpha, torch.Tensor),
        ALIGNED=aligned,
        LOG_T=log_t,
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )


def sq_norm_triton(tensors) -> torch.Tensor:
    addr, numel, bstart, nblk, aligned, log_t = _tables([tensors])
    part = torch.empty(max(nblk, 1), dtype=torch.float32, device=tensors[0].device)
    if nblk == 0:
        return part.zero_().sum()
    _sq_norm_kernel[(nblk,)](
        addr[0],
        numel,
        bstart,
        part,
        tensors[0],
        len(tensors),
        ALIGNED=aligned,
        LOG_T=log_t,
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )
    return part.sum()  # deterministic second stage (n_blocks fp32 partials)


def adamw_lookahead_triton(
    params, grads, exp_avg, exp_avg_sq, source, *, decay, beta1, beta2, step_size, bc2_sqrt, eps
) -> None:
    roles = [params, grads, exp_avg, exp_avg_sq] + ([source] if source is not None else [])
    addr, numel, bstart, nblk, aligned, log_t = _tables(roles)
    if nblk == 0:
        return
    src = source if source is not None else params
    _adamw_lookahead_kernel[(nblk,)](
        addr[0],
        addr[1],
        addr[2],
        addr[3],
        addr[4] if source is not None else addr[0],
        numel,
        bstart,
        params[0],
        grads[0],
        exp_avg[0],
        exp_avg_sq[0],
        src[0],
        len(params),
        decay,
        beta1,
        beta2,
        step_size,
        bc2_sqrt,
        eps,
        HAS_SRC=source is not None,
        ALIGNED=aligned,
        LOG_T=log_t,
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )
