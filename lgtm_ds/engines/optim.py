"""AdamW with the usual decay / no-decay groups, and warmup + linear decay."""

from __future__ import annotations

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
    return torch.optim.AdamW(groups, lr=lr, foreach=False)


def warmup_linear(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float):
    """Linear warmup over ``warmup_ratio * total_steps`` steps, then linear decay to 0."""
    warmup = int(round(warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
