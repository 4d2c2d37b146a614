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


class HeadOutput(dict):
    """``{"hidden": [B, L, H], "weight": [V_model, H](, "bias": [V_model])}``, read as attributes.

    A dict, so that a wrapper which hooks the tensors of its module's output finds all three:
    DeepSpeed's engine forward (its backward prologue) and ZeRO-3's module hooks (the gathers
    for the backward) traverse dicts in place and keep the object. ``weight_param`` /
    ``bias_param`` are plain attributes, not items (ZeRO-3 would take a parameter among a
    module's outputs for an external parameter of the enclosing module): the tensors
    ``weight`` / ``bias`` were read from (the module's parameters, or a functional call's),
    what :func:`grads_through` adds their gradients to; under ZeRO-3 ``weight`` is a hooked
    alias of the gathered parameter, not a view of it.

    ``weight`` / ``bias`` are the live tensors (no copy, also after ``detach()``): read a
    HeadOutput before its model's optimizer steps, or copy them."""

    def __init__(self, hidden, weight, bias=None, weight_param=None, bias_param=None):
        super().__init__(hidden=hidden, weight=weight)
        if bias is not None:
            self["bias"] = bias
        self.weight_param, self.bias_param = weight_param, bias_param

    hidden = property(lambda self: self["hidden"])
    weight = property(lambda self: self["weight"])
    bias = property(lambda self: self.get("bias"))

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
        return HeadOutput(
            self.hidden.detach(), self.weight.detach(), b, self.weight_param, self.bias_param
        )

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
def swap_forward(module: nn.Module, forward):
    """Within the block, ``module.forward`` is ``forward`` (an instance attribute: the module's
    hooks still run around it); an instance-level forward it had (a wrapper's) comes back after."""
    own = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if own is not None:
            module.forward = own
        else:
            del module.forward


@contextlib.contextmanager
def head_mode(module: nn.Module):
    """Within the block, calling ``module`` (directly, through a DeepSpeed engine's forward or
    a functional call) returns :func:`head_forward`'s :class:`HeadOutput`."""

    def forward(*args, **kwargs):
        if args:
            raise TypeError("fused-head forwards take keyword inputs only")
        return head_forward(module, kwargs)

    with swap_forward(module, forward):
        yield


# model.fused_head's default, and the Distiller's: decoders take their losses from hidden states
FUSED_HEAD_DEFAULT = True


class FullLogitsWarning(UserWarning):
    """A decoder takes full logits although the fused head was asked for (the reason says why)."""


def enable_fused_head(task, method_cls, engines: dict, on: bool = True) -> dict:
    """Turn ``fused_head`` on for each engine of ``engines`` (role -> Engine) where the task
    and the method take a HeadOutput and the model's logits are its output layer
    (``task.head_matches``), at any ZeRO stage. Returns role -> None (on, or not asked for:
    ``on`` False or a task without a fused head) or the reason it is off."""
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
        eng.fused_head = why is None
        out[role] = why
    return out


def head_forward(module: nn.Module, inputs: dict) -> HeadOutput:
    """``module``'s body (``get_decoder()``) on ``inputs`` and its output layer's parameters,
    as read now (inside a functional call: the swapped-in tensors)."""
    out = module.get_decoder()(**inputs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return call_head(output_layer(module), hidden)


def call_head(head: nn.Module, hidden: torch.Tensor) -> HeadOutput:
    """The HeadOutput of *calling* the output layer on ``hidden``, its forward swapped for one
    that returns its input and views of its parameters instead of logits.

    Calling the module (rather than reading ``head.weight``) runs the hooks a wrapper put on
    it. Under ZeRO-3 those gather the weight for the forward (the views keep the gathered
    storage alive after the module releases it, until the loss has read it), wrap the outputs
    so that the backward gathers the weight again before its gradient lands (the parameter is
    full-size when its gradient is accumulated and reduce-scattered) and release it once the
    gradient of ``hidden`` (the module's input) has passed, exactly as for an ``nn.Linear``
    call. Without such hooks this is the parameters themselves, as views."""

    read = []

    def forward(x):
        # read the parameters here, while gathered: a ZeRO-3 parameter read outside its
        # module's forward is registered as an external parameter of the enclosing module
        w, b = head.weight, head.bias
        read.extend((w, b))
        return x, w.view_as(w), b.view_as(b) if b is not None else None

    with swap_forward(head, forward):
        hidden, weight, bias = head(hidden)
    return HeadOutput(hidden, weight, bias, *read)


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


def grads_through(
    z, dz, params: list[torch.Tensor], retain_graph: bool = False
) -> list[torch.Tensor]:
    """The gradient of :func:`surrogate` with respect to ``params`` (fp32, float64 stays),
    without touching ``.grad``. On a :class:`HeadOutput` the weight and bias gradients are added
    to their parameters' entries in fp32 directly (a bf16 backward would round them); a frozen
    output layer (not in ``params``) takes none."""
    if not isinstance(z, HeadOutput):
        gs = torch.autograd.grad(
            z, params, dz.to(z.dtype), retain_graph=retain_graph, allow_unused=True
        )
        return [_fp32(g, p) for g, p in zip(gs, params)]
    gs = torch.autograd.grad(
        z.hidden,
        params,
        dz.hidden.to(z.hidden.dtype),
        retain_graph=retain_graph,
        allow_unused=True,
    )
    gs = [_fp32(g, p) for g, p in zip(gs, params)]
    for tensor, source, g in (
        (z.weight, z.weight_param, dz.weight),
        (z.bias, z.bias_param, dz.bias),
    ):
        if g is None or tensor is None:
            continue
        i = next(
            (
                k
                for k, p in enumerate(params)
                if p is source or p is tensor or getattr(tensor, "_base", None) is p
            ),
            None,
        )
        if i is None:
            owner = source if source is not None else tensor
            if not owner.requires_grad:  # a frozen output layer (a LoRA model's base): no grad
                continue
            raise RuntimeError("the output layer's parameter is not among the model's params()")
        gs[i] = gs[i] + g.to(gs[i].dtype)
    return gs


def _fp32(g: torch.Tensor | None, p: torch.Tensor) -> torch.Tensor:
    dtype = torch.promote_types(p.dtype, torch.float32)
    if g is not None:
        return g.to(dtype)
    return torch.zeros(full_shape(p), dtype=dtype, device=p.device)


def full_shape(p: torch.Tensor) -> torch.Size:
    """A parameter's full shape, also when a ZeRO-3 engine has partitioned it (its data is
    then an empty placeholder and DeepSpeed keeps the shape as ``ds_shape``)."""
    return torch.Size(getattr(p, "ds_shape", p.shape))
