"""A decoder's output short of its output layer, so that no full ``[B, L, V]`` logits exist.

With ``Engine.fused_head`` on, a decoder's forward returns a :class:`HeadOutput`: the body's
last hidden states (after the final norm) and the output layer's weight and bias, the tensors
the forward used (a module's parameters with their autograd history, or the functional
forward's work tensors). Logits are ``hidden @ weight.T + bias``; the task
(``tasks/causal_lm.py``) forms them chunk by chunk of token rows inside ``lgtm_kernels``'
fused-linear ops, and a logit gradient comes back as a :class:`HeadGrad` (to the hidden states,
the weight and the bias). ``HeadOutput.full_logits()`` gives the full tensor where a path has no
chunked form.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class HeadOutput:
    """``weight`` / ``bias`` are the live tensors (no copy, also after ``detach()``): read a
    HeadOutput before its model's optimizer steps, or copy them."""

    hidden: torch.Tensor  # [B, L, H]: the body's output, the output layer's input
    weight: torch.Tensor  # [V_model, H]
    bias: torch.Tensor | None = None  # [V_model]

    @property
    def shape(self) -> tuple[int, ...]:
        """The logits' shape ``[B, L, V_model]``."""
        return (*self.hidden.shape[:-1], self.weight.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.hidden.dtype

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    def detach(self) -> HeadOutput:
        b = self.bias.detach() if self.bias is not None else None
        return HeadOutput(self.hidden.detach(), self.weight.detach(), b)

    def full_logits(self) -> torch.Tensor:
        """The full logits (with graph): for paths that have no chunked form."""
        return F.linear(self.hidden, self.weight, self.bias)


@dataclass
class HeadGrad:
    """A logit gradient taken through the output layer: ``d/d hidden`` ([B, L, H], zero at
    ignored positions) and ``d/d weight``, ``d/d bias`` (fp32, or float64)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None

    def __mul__(self, w: float) -> HeadGrad:
        b = self.bias * w if self.bias is not None else None
        return HeadGrad(self.hidden * w, self.weight * w, b)

    __rmul__ = __mul__


def output_layer(module: nn.Module) -> nn.Module:
    return module.get_output_embeddings()


@contextlib.contextmanager
def head_mode(module: nn.Module, as_dict: bool = False):
    """Within the block, calling ``module`` (directly, through a DeepSpeed engine's forward or
    a functional call) returns :func:`head_forward`'s :class:`HeadOutput`; ``as_dict``: a dict
    ``hidden`` / ``weight`` / ``bias`` with the parameters as views (a wrapper that hooks the
    tensors of its module's output, as DeepSpeed's engine does, then sees all three)."""

    def forward(*args, **kwargs):
        if args:
            raise TypeError("fused-head forwards take keyword inputs only")
        out = head_forward(module, kwargs)
        if not as_dict:
            return out
        view = lambda t: t.view_as(t) if t is not None else None  # noqa: E731
        return {"hidden": out.hidden, "weight": view(out.weight), "bias": view(out.bias)}

    own = module.__dict__.get("forward")  # an instance-level forward (a wrapper) stays
    module.forward = forward
    try:
        yield
    finally:
        if own is not None:
            module.forward = own
        else:
            del module.forward


def enable_fused_head(task, method_cls, engines: dict, on: bool = True) -> dict:
    """Turn ``fused_head`` on for each engine of ``engines`` (role -> Engine) where the task
    and the method take a HeadOutput, the engine can (not ZeRO-3) and the model's logits are its
    output layer (``task.head_matches``). Returns role -> None (on, or not asked for: ``on``
    False or a task without a fused head) or the reason it is off."""
    out = {}
    for role, eng in engines.items():
        eng.fused_head = False
        if not (on and task.fused_head):
            out[role] = None
            continue
        if not method_cls.fused_head:
            out[role] = f"method {method_cls.name} takes full logits"
            continue
        why = task.head_matches(eng.module)
        if why is None and not eng.supports_fused_head:
            why = "ZeRO-3 shards the output layer"
        eng.fused_head = why is None
        out[role] = why
    return out


def head_forward(module: nn.Module, inputs: dict) -> HeadOutput:
    """``module``'s body (``get_decoder()``) on ``inputs`` and its output layer's parameters,
    as read now (inside a functional call: the swapped-in tensors)."""
    out = module.get_decoder()(**inputs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    head = output_layer(module)
    return HeadOutput(hidden, head.weight, head.bias)


def surrogate(z, dz) -> torch.Tensor:
    """A scalar whose gradient with respect to the model's parameters is the logit gradient
    ``dz`` taken through the model: ``(z * dz).sum()`` on logits; on a :class:`HeadOutput`,
    ``(hidden * dz.hidden).sum() + (weight * dz.weight).sum() (+ bias)``."""
    if not isinstance(z, HeadOutput):
        return (z * dz.to(z.dtype)).sum()
    out = (z.hidden * dz.hidden.to(z.hidden.dtype)).sum()
    out = out + (z.weight * dz.weight.to(z.weight.dtype)).sum()
    if z.bias is not None and dz.bias is not None:
        out = out + (z.bias * dz.bias.to(z.bias.dtype)).sum()
    return out


def grads_through(z, dz, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The gradient of :func:`surrogate` with respect to ``params`` (fp32, float64 stays),
    without touching ``.grad``. On a :class:`HeadOutput` the weight and bias gradients are added
    to their parameters' entries in fp32 directly (a bf16 backward would round them)."""
    if not isinstance(z, HeadOutput):
        gs = torch.autograd.grad(z, params, grad_outputs=dz.to(z.dtype), allow_unused=True)
        return [_fp32(g, p) for g, p in zip(gs, params)]
    gs = torch.autograd.grad(
        z.hidden, params, grad_outputs=dz.hidden.to(z.hidden.dtype), allow_unused=True
    )
    gs = [_fp32(g, p) for g, p in zip(gs, params)]
    for tensor, g in ((z.weight, dz.weight), (z.bias, dz.bias)):
        if g is None or tensor is None:
            continue
        i = next(
            (k for k, p in enumerate(params) if p is tensor or getattr(tensor, "_base", None) is p),
            None,
        )
        if i is None:
            raise RuntimeError("the output layer's parameter is not among the model's params()")
        gs[i] = gs[i] + g.to(gs[i].dtype)
    return gs


def _fp32(g: torch.Tensor | None, p: torch.Tensor) -> torch.Tensor:
    dtype = torch.promote_types(p.dtype, torch.float32)
    return torch.zeros(p.shape, dtype=dtype, device=p.device) if g is None else g.to(dtype)
