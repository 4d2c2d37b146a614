"""Fused knowledge-distillation loss from raw logits: softmax(./T) of both inputs + divergence.

Semantics (both backends):
  P = softmax(target_logits / T) (no gradient), Q = softmax(logits / T).
  forward_kl = KL(P || Q), reverse_kl = KL(Q || P), jsd = beta KL(P || M) + (1 - beta) KL(Q || M)
  with M = beta P + (1 - beta) Q. As in TRL ``generalized_jsd_loss`` and Liger ``LigerJSD``,
  jsd with beta == 0 is *defined* as forward_kl and beta == 1 as reverse_kl (the formula itself
  tends to 0 at both ends).
  -inf logits: probability 0. 0 * log 0 = 0 and 0 * log(x / 0) = 0, so entries that are -inf in
  both inputs (masked vocabulary) drop out exactly; p * log(p / 0) = +inf, so forward KL is +inf
  if the teacher puts mass where the student logit is -inf (the gradient stays (Q - P) / T,
  finite) and reverse KL is +inf in the mirrored case (its gradient is then undefined: non-finite).
  JSD is always finite. A row whose logits are all -inf (in either input) counts as masked:
  loss 0, gradient 0. +inf / NaN inputs are not supported, but they are never hidden: such a
  row's loss and gradient come out NaN/inf (not 0 as for a masked row), so a diverged model
  trips the divergence guard instead of training on silently.
  Rows: inputs [..., V] are flattened to [rows, V]. ``mask`` [rows] (True = keep) drops rows,
  ``weights`` [rows] scales them. Reductions: "batchmean" = sum_i w_i l_i / (number of rows kept
  by ``mask``; all rows without a mask; 1 if none is kept), "sum" = sum_i w_i l_i, "none" = the
  vector w_i l_i (0 for masked rows). ``scale_by_t2`` multiplies everything by T^2.
"""

from __future__ import annotations

import torch

from ._backend import backend_for

_DIVS = ("forward_kl", "reverse_kl", "jsd")
_REDS = ("batchmean", "sum", "none")
_NEG = float("-inf")


def _resolve_div(divergence: str, beta: float) -> str:
    if divergence not in _DIVS:
        raise ValueError(f"divergence must be one of {_DIVS}, got {divergence!r}")
    if divergence == "jsd":
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        if beta == 0.0:
            return "forward_kl"  # TRL / Liger convention
        if beta == 1.0:
            return "reverse_kl"
    return divergence


# ----------------------------------------------------------------------------------------------
# torch reference (also the CPU backend). Memory traffic per element of the [N, V] inputs:
# read s, t (2 x input bytes); write fp32 a, b, log-softmaxes, probs (~6 x 4 B); the gradient
# adds ~4 more fp32 temporaries and one write in the input dtype. Peak extra ~ 10 fp32 N x V.
# ----------------------------------------------------------------------------------------------
def kd_rows_ref(
    s: torch.Tensor,
    t: torch.Tensor,
    *,
    div: str,
    inv_T: float,
    beta: float,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per-row loss [N], unweighted gradient [N, V] (or None), row-ok flags [N]; fp32, or
    float64 when an input is float64."""
    acc = _acc_dtype(s, t)
    a = s.to(acc) * inv_T  # read N V, write 4 N V
    b = t.to(acc) * inv_T
    ma = a.amax(-1, keepdim=True)
    mb = b.amax(-1, keepdim=True)
    ok = (ma != _NEG) & (mb != _NEG)  # a NaN row is kept: its loss and gradient are NaN
    ma = torch.where(ma > _NEG, ma, 0.0)
    mb = torch.where(mb > _NEG, mb, 0.0)
    la = (a - ma) - torch.log(torch.exp(a - ma).sum(-1, keepdim=True))
    lb = (b - mb) - torch.log(torch.exp(b - mb).sum(-1, keepdim=True))
    p, q = lb.exp(), la.exp()
    a_inf, b_inf = a == _NEG, b == _NEG
    if div == "forward_kl":
        term = torch.where(b_inf, 0.0, torch.where(a_inf, float("inf"), p * (lb - la)))
        gq = None
    elif div == "reverse_kl":
        gq = torch.where(a_inf, 0.0, torch.where(b_inf, float("inf"), la - lb))
        term = torch.where(a_inf, 0.0, q * gq)
    else:
        mix = beta * p + (1.0 - beta) * q
        lm = torch.log(mix)
        gq = torch.where((q > 0) & (mix > 0), (1.0 - beta) * (la - lm), 0.0)
        term = torch.where((p > 0) & (mix > 0), beta * p * (lb - lm), 0.0) + q * gq
    loss = term.sum(-1)  # read N V
    ok = ok.squeeze(-1)
    grad = None
    if compute_grad:
        if div == "forward_kl":
            grad = (q - p) * inv_T
        else:
            S = (q * gq).sum(-1, keepdim=True)  # = loss for reverse KL
            grad = torch.where(q > 0, q * (gq - S), 0.0) * inv_T
    return loss, grad, ok


def kd_rows_torch(s, t, *, div, inv_T, beta, compute_grad):
    """The torch path (CPU, float64, CUDA without Triton): :func:`kd_rows_ref`'s results with
    ~5 ``N x V`` temporaries instead of ~15 for the forward KL (log-softmaxes by torch, the
    products in place); the other divergences take the reference."""
    if div != "forward_kl":
        return kd_rows_ref(s, t, div=div, inv_T=inv_T, beta=beta, compute_grad=compute_grad)
    acc = _acc_dtype(s, t)
    a = s.to(acc) * inv_T
    b = t.to(acc) * inv_T
    ok = (a.amax(-1) != _NEG) & (b.amax(-1) != _NEG)  # a NaN row is kept (NaN loss, gradient)
    la = torch.log_softmax(a, -1)
    del a
    lb = torch.log_softmax(b, -1)
    del b
    p = lb.exp()
    term = lb.sub_(la).mul_(p)  # p (log p - log q); +inf where only the student is -inf
    term.masked_fill_(torch.isneginf(t), 0.0)  # target -inf: p = 0 adds nothing (0 * inf)
    loss = term.sum(-1)
    del term
    grad = la.exp_().sub_(p).mul_(inv_T) if compute_grad else None  # (q - p) / T
    return loss, grad, ok


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64 (computed in float64, torch path), else fp32."""
    return torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32


def _row_factors(n, device, weights, mask, reduction, lscale, dtype=torch.float32):
    """Row weights (``dtype`` or None), mask (bool or None), gradient scale [1] ``dtype``
    (device-side); ``dtype`` is fp32, or float64 for float64 inputs."""
    w = None
    if weights is not None:
        w = weights.reshape(-1).to(device=device, dtype=dtype).contiguous()
        if w.numel() != n:
            raise ValueError(f"weights has {w.numel()} entries, expected {n} rows")
    m = None
    if mask is not None:
        m = mask.reshape(-1).to(device=device, dtype=torch.bool).contiguous()
        if m.numel() != n:
            raise ValueError(f"mask has {m.numel()} entries, expected {n} rows")
    if reduction == "batchmean":
        if m is not None:  # stays on device: no host sync for the count of kept rows
            gscale = (1.0 / m.sum().clamp_min(1).to(dtype)).reshape(1)
        else:
            gscale = torch.full((1,), 1.0 / max(n, 1), dtype=dtype, device=device)
    else:
        gscale = torch.ones(1, dtype=dtype, device=device)
    return w, m, gscale


class _KDLossFunction(torch.autograd.Function):
    """Forward computes the loss and, when a gradient is needed, the gradient too (one pass for
    rows held on chip); backward only rescales it by grad_output."""

    @staticmethod
    def forward(ctx, s, t, div, inv_T, beta, w, m, gscale, lscale, reduction, inplace, backend):
        need = ctx.needs_input_grad[0]
        if backend == "triton":
            from ._kd_triton import kd_rows_triton

            gbuf = None
            if need:
                gbuf = s if inplace else torch.empty_like(s)
            rows, grad = kd_rows_triton(
                s,
                t,
                div=div,
                inv_T=inv_T,
                beta=beta,
                lscale=lscale,
                weights=w,
                mask=m,
                gscale=gscale,
                compute_grad=need,
                grad_out=gbuf,
            )
        else:
            loss, g32, ok = kd_rows_torch(s, t, div=div, inv_T=inv_T, beta=beta, compute_grad=need)
            keep = ok if m is None else ok & m
            wr = torch.full_like(loss, lscale) if w is None else w * lscale
            rows = torch.where(keep, wr * loss, 0.0)
            grad = None
            if need:
                g32 = torch.where(keep[:, None], g32 * (wr * gscale)[:, None], 0.0)
                if inplace:
                    s.copy_(g32)
                    grad = s
                else:
                    grad = g32.to(s.dtype)
        if reduction == "none":
            out = rows
        elif reduction == "sum":
            out = rows.sum()
        else:
            out = rows.sum() * gscale[0]
        ctx.reduction = reduction
        if need:
            ctx.save_for_backward(grad)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        if ctx.reduction == "none":
            grad.mul_(grad_output.to(grad.dtype)[:, None])
        elif not (grad_output.numel() == 1 and bool(grad_output == 1)):
            # note: `bool(...)` above is a host sync point (as in Liger); it saves a full
            # read + write of the gradient when the loss is backpropagated with grad 1.
            grad.mul_(grad_output.to(grad.dtype))
        return (grad,) + (None,) * 11


def kd_loss(
    logits: torch.Tensor,
    target_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
    scale_by_t2: bool = False,
    inplace_grad: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Distillation loss between student ``logits`` and teacher ``target_logits`` (see module doc).

    The gradient flows to ``logits`` only and is returned in its dtype. With ``inplace_grad`` the
    gradient is written into the storage of ``logits`` (its values are destroyed by the forward;
    use only when nothing else reads them). The gradient is computed during the forward when
    ``logits`` requires grad, so calling backward twice is not supported. ``backend`` overrides
    ``LGTM_KERNELS_BACKEND`` for this call: "triton", "torch", or "auto" (Triton on CUDA
    tensors, torch elsewhere); None (default) reads the variable. float64 inputs are computed
    in float64 on the torch path (the Triton kernels compute in fp32).
    """
    if reduction not in _REDS:
        raise ValueError(f"reduction must be one of {_REDS}, got {reduction!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.shape != target_logits.shape:
        raise ValueError(f"shape mismatch: {tuple(logits.shape)} vs {tuple(target_logits.shape)}")
    div = _resolve_div(divergence, beta)
    V = logits.shape[-1]
    s = logits.reshape(-1, V)
    t = target_logits.reshape(-1, V)
    if s.stride(-1) != 1:
        if inplace_grad:
            raise ValueError("inplace_grad needs logits with unit stride along the vocabulary")
        s = s.contiguous()
    if t.stride(-1) != 1:
        t = t.contiguous()
    n = s.shape[0]
    lscale = float(temperature) ** 2 if scale_by_t2 else 1.0
    acc = _acc_dtype(s, t)
    w, m, gscale = _row_factors(n, s.device, weights, mask, reduction, lscale, acc)
    backend = backend_for(s, t, choice=backend)
    if acc == torch.float64:
        backend = "torch"  # the Triton kernels compute in fp32; float64 stays float64
    return _KDLossFunction.apply(
        s,
        t.detach(),
        div,
        1.0 / float(temperature),
        float(beta),
        w,
        m,
        gscale,
        lscale,
        reduction,
        bool(inplace_grad),
        backend,
    )


def kd_loss_ref(logits, target_logits, **kw) -> torch.Tensor:
    """kd_loss forced onto the pure-torch path (same semantics, fp32 temporaries)."""
    return kd_loss(logits, target_logits, backend="torch", **kw)
