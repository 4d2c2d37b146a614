"""The look-ahead student: one simulated step of the student's own AdamW, state untouched."""

from __future__ import annotations

from typing import TYPE_CHECKING

import lgtm_kernels
import torch

if TYPE_CHECKING:
    from ..engines.base import AdamState


def adamw_lookahead(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    state: AdamState,
    out: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """``theta + AdamW_update(g)``: one simulated step of the student's own optimizer.

    Same order of operations as ``torch.optim.AdamW`` (decoupled weight decay first, then
    ``m_hat / (sqrt(v') / sqrt(bc2) + eps)``); moments are read, never written. Returns new
    tensors in fp32 (fp64 for fp64 params), or ``out`` written (it may be ``grads`` itself:
    each element is read before it is written). fp32 goes through
    ``lgtm_kernels.adamw_lookahead_`` (one launch per hyper-parameter group on CUDA); fp64 (the
    test oracle) through the loop below.
    """
    t = state.step + 1
    if all(p.dtype == torch.float32 for p in params) and (
        out is None or all(o.dtype == torch.float32 for o in out)
    ):
        out = [torch.empty_like(p) for p in params] if out is None else out
        zeros = None if state.exp_avg is not None else [torch.zeros_like(p) for p in params]
        m_all = state.exp_avg if state.exp_avg is not None else zeros
        v_all = state.exp_avg_sq if state.exp_avg_sq is not None else zeros
        groups: dict[tuple, list[int]] = {}
        for i in range(len(params)):
            key = (state.lr[i], *state.betas[i], state.eps[i], state.weight_decay[i])
            groups.setdefault(key, []).append(i)
        for (lr, b1, b2, eps, wd), idx in groups.items():
            pick = lambda xs, idx=idx: [xs[i] for i in idx]  # noqa: E731
            lgtm_kernels.adamw_lookahead_(
                pick(out),
                [g.float() for g in pick(grads)],
                pick(m_all),
                pick(v_all),
                step=t,
                lr=lr,
                beta1=b1,
                beta2=b2,
                eps=eps,
                weight_decay=wd,
                source=pick(params),
            )
        return out
    into, out = out, []
    for i, (p, g) in enumerate(zip(params, grads)):
        dtype = torch.promote_types(p.dtype, torch.float32)
        b1, b2 = state.betas[i]
        lr, eps, wd = state.lr[i], state.eps[i], state.weight_decay[i]
        g = g.to(dtype)
        m = state.exp_avg[i].to(dtype) if state.exp_avg is not None else torch.zeros_like(g)
        v = state.exp_avg_sq[i].to(dtype) if state.exp_avg_sq is not None else torch.zeros_like(g)
        m = m * b1 + (1 - b1) * g
        v = v * b2 + (1 - b2) * g * g
        bc1 = 1 - b1**t
        bc2 = 1 - b2**t
        denom = v.sqrt() / (bc2**0.5) + eps
        out.append(p.to(dtype) * (1 - lr * wd) - (lr / bc1) * (m / denom))
    if into is not None:
        for o, x in zip(into, out):
            o.copy_(x)
        return into
    return out
