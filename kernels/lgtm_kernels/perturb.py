"""In-place parameter perturbation, fused squared norm and AdamW look-ahead over tensor lists.

All three take lists of tensors (model parameters, or one flat buffer as a list of one) and do
fp32 math per element, rounding once into the destination dtype. On CUDA (or with
``LGTM_KERNELS_BACKEND=triton``) each dtype group is one Triton launch over the whole list;
the torch references below loop over the tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._backend import backend_for

Tensors = Sequence[torch.Tensor]


def _as_list(x) -> list[torch.Tensor]:
    return [x] if isinstance(x, torch.Tensor) else list(x)


def _check(name: str, ref: list[torch.Tensor], other: list[torch.Tensor]) -> None:
    if len(other) != len(ref):
        raise ValueError(f"{name}: {len(other)} tensors, expected {len(ref)}")
    for a, b in zip(ref, other, strict=True):
        if a.numel() != b.numel():
            raise ValueError(f"{name}: numel {b.numel()} != {a.numel()}")


def _with_source(lists: list[list[torch.Tensor]], source) -> list[torch.Tensor] | None:
    """Check ``source`` (None, a tensor or a list) against the params ``lists[0]`` and append it
    to ``lists`` as the last role; return it as a list (None if not given)."""
    if source is None:
        return None
    source = _as_list(source)
    _check("source", lists[0], source)
    lists.append(source)
    return source


def _groups(lists: list[list[torch.Tensor]]):
    """Split parallel lists into groups with one dtype per role (one launch per group)."""
    out: dict = {}
    for i in range(len(lists[0])):
        key = tuple(lst[i].dtype for lst in lists)
        out.setdefault(key, []).append(i)
    return [[[lst[i] for i in idx] for lst in lists] for idx in out.values()]


def _triton_ok(lists) -> bool:
    return all(t.is_contiguous() for lst in lists for t in lst)


# ---------------------------------------------------------------------------- torch references
def perturb_ref_(params: Tensors, direction: Tensors, alpha, *, source: Tensors | None = None):
    """p = (source or p) + alpha * v in fp32, rounded once into p.
    Traffic per element: read p|source, read v, write fp32 temp, read it, write p."""
    src = source if source is not None else params
    for p, v, s in zip(params, direction, src, strict=True):
        v32 = v.float().reshape(s.shape)
        if isinstance(alpha, torch.Tensor):  # device scalar: no host sync
            p.copy_(torch.addcmul(s.float(), v32, alpha.to(device=s.device, dtype=torch.float32)))
        else:
            p.copy_(torch.add(s.float(), v32, alpha=alpha))  # a new tensor, never written into s


def global_sq_norm_ref(tensors: Tensors) -> torch.Tensor:
    """sum of squares (fp32 accumulation). Traffic: read each element once (+ fp32 temps)."""
    tensors = list(tensors)
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    parts = [t.float().square().sum() for t in tensors]
    return torch.stack(parts).sum()


def adamw_lookahead_ref_(
    params, grads, exp_avg, exp_avg_sq, *, step, lr, beta1, beta2, eps, weight_decay, source=None
):
    """torch.optim.AdamW's update applied to p (from source if given) with the moments left as
    they are. Traffic: read p|source, g, m, v; ~6 fp32 temporaries per element; write p."""
    c = _adam_consts(step, lr, beta1, beta2, weight_decay)
    src = source if source is not None else params
    for p, g, m, v, s in zip(params, grads, exp_avg, exp_avg_sq, src, strict=True):
        x = s.float() * c["decay"]
        g32 = g.float()
        m2 = torch.lerp(m.float(), g32, 1 - beta1)
        v2 = v.float() * beta2 + (1 - beta2) * g32 * g32
        denom = v2.sqrt() / c["bc2_sqrt"] + eps
        p.copy_(x - c["step_size"] * (m2 / denom))


def _adam_consts(step, lr, beta1, beta2, weight_decay):
    if step < 1:
        raise ValueError(f"step is the step being taken (state step + 1), >= 1; got {step}")
    return {
        "decay": 1.0 - lr * weight_decay,
        "step_size": lr / (1.0 - beta1**step),
        "bc2_sqrt": math.sqrt(1.0 - beta2**step),
    }


# ---------------------------------------------------------------------------- public API
def perturb_(params, direction, alpha, *, source=None) -> None:
    """In place ``p += alpha * v`` (or ``p = source + alpha * v``) for every tensor of the list.

    alpha: float or a 1-element fp32 tensor on the params' device (e.g. r / ||v|| computed on
    device, so no host sync). With ``source`` (fp32 masters), the small step is not lost to the
    rounding of a bf16 ``p + alpha v`` chain, and ``alpha = 0`` restores p from the masters.
    """
    params, direction = _as_list(params), _as_list(direction)
    _check("direction", params, direction)
    lists = [params, direction]
    source = _with_source(lists, source)
    if not params:
        return
    if backend_for(*params) == "triton" and _triton_ok(lists):
        from ._multi_tensor_triton import perturb_triton

        if isinstance(alpha, torch.Tensor):
            alpha = alpha.to(device=params[0].device, dtype=torch.float32).reshape(1)
        for grp in _groups(lists):
            perturb_triton(grp[0], grp[1], alpha, grp[2] if source is not None else None)
        return
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.reshape(()).to(torch.float32)
    perturb_ref_(params, direction, alpha, source=source)


def global_sq_norm(tensors) -> torch.Tensor:
    """fp32 0-d tensor: sum over the list of sum(x^2). Callers all-reduce it, then sqrt."""
    tensors = _as_list(tensors)
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    if backend_for(*tensors) == "triton" and _triton_ok([tensors]):
        from ._multi_tensor_triton import sq_norm_triton

        total = None
        for (grp,) in _groups([tensors]):
            part = sq_norm_triton(grp)
            total = part if total is None else total + part
        return total
    return global_sq_norm_ref(tensors)


def adamw_lookahead_(
    params,
    grads,
    exp_avg,
    exp_avg_sq,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    source=None,
) -> None:
    """Write into ``params`` what one torch.optim.AdamW step would give, without touching the
    moments: ``p = p_or_source * (1 - lr wd) - lr / bc1 * m' / (sqrt(v') / sqrt(bc2) + eps)``
    with m' = b1 m + (1 - b1) g, v' = b2 v + (1 - b2) g^2, bc_k = 1 - beta_k^step, ``step`` the
    number of the step being taken (optimizer state step + 1)."""
    params, grads = _as_list(params), _as_list(grads)
    exp_avg, exp_avg_sq = _as_list(exp_avg), _as_list(exp_avg_sq)
    for name, lst in (("grads", grads), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        _check(name, params, lst)
    lists = [params, grads, exp_avg, exp_avg_sq]
    source = _with_source(lists, source)
    if not params:
        return
    c = _adam_consts(step, lr, beta1, beta2, weight_decay)
    if backend_for(*params) == "triton" and _triton_ok(lists):
        from ._multi_tensor_triton import adamw_lookahead_triton

        for grp in _groups(lists):
            adamw_lookahead_triton(
                grp[0],
                grp[1],
                grp[2],
                grp[3],
                grp[4] if source is not None else None,
                decay=c["decay"],
                beta1=beta1,
                beta2=beta2,
                step_size=c["step_size"],
                bc2_sqrt=c["bc2_sqrt"],
                eps=eps,
            )
        return
    adamw_lookahead_ref_(
        params,
        grads,
        exp_avg,
        exp_avg_sq,
        step=step,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        source=source,
    )
