"""AdamW with the usual decay / no-decay groups and a non-finite guard; warmup + linear decay.

The guard (:func:`guard_nonfinite_`): the optimizer skips its step, state untouched, when a
gradient it is given holds inf/NaN, and says so through ``overflow`` (the attribute DeepSpeed's
engine reads after ``optimizer.step()``: a skipped step is then counted, ``was_step_applied()``
is False and the LR schedule does not advance, as after an fp16 overflow). DeepSpeed's
ZeRO-1/2/3 and bf16/fp16 wrappers check the gradients themselves before calling it (the adapter
switches the check off there); the guard is what protects ZeRO-0 fp32 engines and plain
:class:`TorchEngine` s.
"""

from __future__ import annotations

import types

import torch

_NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


def build_adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """Plain ``torch.optim.AdamW`` (a DeepSpeed "AdamW" would JIT-build FusedAdam)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if any(k in name for k in _NO_DECAY) else decay).append(p)
    groups = [
        g
        for g in (
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        )
        if g["params"]
    ]
    # foreach=False: identical arithmetic on every backend, so engine paths compare bit for bit
    return guard_nonfinite_(torch.optim.AdamW(groups, lr=lr, foreach=False))


def guard_nonfinite_(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Make ``optimizer.step()`` skip (state untouched) when a gradient is non-finite; returns
    the optimizer (its type unchanged: DeepSpeed accepts exact ``torch.optim.AdamW`` only).

    ``optimizer.overflow``: True after a skipped step, False after an applied one.
    ``optimizer.check_finite``: False where a wrapper already checked (saves one pass over the
    gradients and one host sync)."""
    plain_step = optimizer.step  # bound; the LR scheduler wraps what we set (a bound method)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is None and self.check_finite:
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            self.overflow = bool(grads) and not _all_finite(grads)  # note: host sync
            if self.overflow:
                return None
        else:
            self.overflow = False
        return plain_step(closure)

    optimizer.overflow = False
    optimizer.check_finite = True
    optimizer.step = types.MethodType(step, optimizer)
    return optimizer


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Every element finite (one reduction per device and dtype, one host sync)."""
    by_key: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        by_key.setdefault((t.device, t.dtype), []).append(t)
    # the sum of per-tensor norms is non-finite iff an element is (or the norm overflows fp32,
    # which no useful gradient does)
    total = [torch.stack(torch._foreach_norm(ts)).sum().float().cpu() for ts in by_key.values()]
    return bool(torch.isfinite(torch.stack(total)).all())


def warmup_linear(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float):
    """Linear warmup over ``warmup_ratio * total_steps`` steps, then linear decay to 0."""
    warmup = int(round(warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return _SkipAwareLambdaLR(optimizer, factor)


class _SkipAwareLambdaLR(torch.optim.lr_scheduler.LambdaLR):
    """Does not advance after a step the optimizer skipped (:func:`guard_nonfinite_`)."""

    def step(self, *args, **kwargs):
        if getattr(self.optimizer, "overflow", False):
            return
        super().step(*args, **kwargs)
