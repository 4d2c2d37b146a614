"""The student at other parameter values under ZeRO-3: the influence passes (LGTM's steps A-D,
MetaDistil's pilot) with DeepSpeed's gather/release hooks off, on this rank's partitions,
gathering one module's parameters at a time. One of the modules that import DeepSpeed.

- :meth:`Zero3Functional.hooks_off`: the module runs functionally, ZeRO-3's hooks removed and
  registered again after (the pattern of TRL's ``unwrap_model_for_generation``).
- Partitioned passes: ``g``, the look-ahead, ``v`` and ``theta`` exist only as this rank's fp32
  parts (:class:`~lgtm_ds.engines.base.Sharded`); each forward forms its parameters module by
  module (a pre-hook all-gathers them, a hook drops them); where a gradient is needed the
  gather is an autograd Function whose backward reduce-scatters the gradient into this rank's
  part, and what the autograd graph saves of a gathered parameter is a recipe, gathered again
  in the backward (:func:`_regathered`), as ZeRO-3 does for its own weights.
- A model that reads a trainable parameter outside its own module's forward (it would see
  ZeRO-3's empty placeholder) is detected on the first step (:meth:`accept_partitions`) and
  runs on full tensors from then on.
"""

from __future__ import annotations

import contextlib
import logging
import weakref

import torch

from .base import Sharded, _axpy, accumulate_grads, get_logits, model_inputs

_log = logging.getLogger(__name__)


@contextlib.contextmanager
def zero3_hooks_off(engine, gather: list):
    """A ZeRO-3 DeepSpeed ``engine`` with its module's gather/release hooks removed for the
    block and put back after; the parameters in ``gather`` are all-gathered for the block (full
    on every rank, one collective) and re-partitioned on exit. Everything gathered before is
    released first. Every rank must enter together."""
    import deepspeed
    from deepspeed.runtime.zero import parameter_offload as po

    # a training engine's ZeRO-3 optimizer holds the offloader; an engine without an optimizer
    # (a frozen teacher) has the offloader as its optimizer
    offload = getattr(engine.optimizer, "parameter_offload", engine.optimizer)
    offload.empty_partition_cache()  # release everything gathered, persistent params too
    stack_len = len(po.FWD_MODULE_STACK)
    offload._remove_module_hooks()
    offload.forward_hooks, offload.backward_hooks = [], []
    try:
        with deepspeed.zero.GatheredParameters(gather, modifier_rank=None, enabled=bool(gather)):
            yield
    finally:
        offload.setup_zero_stage3_hooks()
        del po.FWD_MODULE_STACK[stack_len:]  # setup pushes the top module again
        offload.get_param_coordinator().reset_step()


class Zero3Functional:
    """The partitioned influence passes of one DeepSpeed student engine ``s``."""

    def __init__(self, s):
        self.s = s
        self.stage = s.stage
        # None = not tried yet, then whether this model's passes run on partitions
        self.partitioned: bool | None = None

    @contextlib.contextmanager
    def hooks_off(self):
        """ZeRO-3 (else nothing): run the module functionally on the tensors the pass forms
        (full fp32 ``theta +- R v``, or formed from partitions module by module: :meth:`perturbed`,
        :meth:`grad_at`) with DeepSpeed's ZeRO-3 gather/release hooks removed, and put the hooks
        back after.

        The influence passes never read or write the shards: a bf16 student's forwards see the
        fp32 perturbation (a bf16 shard would round ``R v`` away), and the student's parameters
        are untouched by construction. Frozen parameters, if any, are gathered for the block.
        The same pattern as TRL's ``unwrap_model_for_generation`` (remove the hooks, re-register
        them).
        """
        if self.stage < 3:
            yield
            return
        frozen = [p for p in self.s.module.parameters() if not p.requires_grad]
        with zero3_hooks_off(self.s.engine, frozen):
            yield

    def gather_flat(self, p, part: torch.Tensor) -> torch.Tensor:
        """The ``world * n`` elements of every rank's part of ``p`` (one all-gather)."""
        import deepspeed.comm as dist

        group = p.ds_process_group
        full = part.new_empty(dist.get_world_size(group=group) * part.numel())
        dist.all_gather_into_tensor(full, part.contiguous(), group=group)  # note: collective
        return full

    def gather_one(self, p, part: torch.Tensor) -> torch.Tensor:
        """The full tensor of ``p``'s shape from every rank's part."""
        return self.gather_flat(p, part).narrow(0, 0, p.ds_numel).view(p.ds_shape)

    def scatter_mean(self, p, grad: torch.Tensor) -> torch.Tensor:
        """This rank's part of the rank-average of ``grad`` (a full gradient of ``p``): one
        reduce-scatter of the zero-padded flat gradient."""
        import deepspeed.comm as dist

        group = p.ds_process_group
        world, n = dist.get_world_size(group=group), p.ds_tensor.ds_numel
        padded = grad.new_zeros(world * n)
        padded.narrow(0, 0, grad.numel()).copy_(grad.reshape(-1))
        out = grad.new_empty(n)
        dist.reduce_scatter_tensor(out, padded, group=group)  # note: collective
        return out.div_(world)

    @property
    def shards(self) -> bool:
        """Whether the influence passes run on this rank's partitions (ZeRO-3, unless this
        model was found unable to)."""
        return self.stage == 3 and self.partitioned is not False

    @contextlib.contextmanager
    def partitioned_backward(self):
        if not self.shards:
            yield None
            return
        with self.hooks_off():
            pb = _PartitionedBackward(self)
            with self.s._per_module(pb.form) as formed, _regathered(pb.live):
                pb.formed = formed
                yield pb

    def accept_partitions(self, pb, error: Exception | None = None) -> bool:
        if error is None and len(pb.formed) == len(pb.params):
            self.partitioned = True
            return True
        if error is not None and self.partitioned is not None:
            raise error  # it worked before (or was given up already): a real error
        self.partitioned = False
        _log.warning(
            "%s: the ZeRO-3 influence passes cannot run on partitions for this model (%s); "
            "they run on full fp32 tensors from now on (O(student) memory per rank)",
            self.s.role,
            f"{type(error).__name__}: {error}"
            if error is not None
            else "a parameter is read outside its module's forward, or never read",
        )
        return False

    def perturbed(self, theta: Sharded, v: Sharded, alpha: float, batch: dict):
        """Step D on partitions: each module's ``theta + alpha v`` formed from this rank's
        parts and all-gathered just before its forward (one module's parameters at a time)."""
        params = self.s.params()

        def form(i):
            local = torch.empty_like(v[i])
            _axpy([local], [theta[i]], [v[i]], alpha)
            return self.gather_one(params[i], local)

        return self.s._forward_formed(form, batch)

    def grad_at(self, parts: Sharded, batches, loss_fn):
        """Step C on partitions: the gradient at the parameters whose parts are ``parts``,
        rank-averaged, as a :class:`Sharded` list. Each module's parameters are all-gathered
        before its forward through :class:`_GatherPart` (whose backward reduce-scatters the
        gradient to this rank's part); what the autograd graph saves of them is a recipe, not
        the tensor (:func:`_regathered`), gathered again in the backward. Peak: the parts, one
        module's parameters and the activations, not a full copy of the model."""
        params, s = self.s.params(), self.s
        leaves = [x.detach().requires_grad_() for x in parts]
        live: dict = {}  # storage address -> (weakref to the gathered tensor, re-gather)

        def form(i):
            p, part = params[i], leaves[i].detach()
            work = _GatherPart.apply(leaves[i], self, p)
            live[work.untyped_storage().data_ptr()] = (
                weakref.ref(work),
                lambda: self.gather_flat(p, part),
            )
            return work

        grads, total = None, 0.0
        for b in batches:
            with s._per_module(form), _regathered(live), s.head_ctx():
                loss = loss_fn(get_logits(s.module(**model_inputs(b))), b)
                gs = torch.autograd.grad(loss / len(batches), leaves, allow_unused=True)
            live.clear()
            grads = accumulate_grads(grads, gs, leaves)
            del gs
            total += loss.detach()
        if grads is None:
            grads = [torch.zeros_like(x) for x in leaves]
        return Sharded(grads), total / max(len(batches), 1)


class _GatherPart(torch.autograd.Function):
    """``part`` (this rank's flat part of ZeRO-3 parameter ``p``) -> the full tensor
    (all-gather); backward: the gradient's part of the rank-average (reduce-scatter)."""

    @staticmethod
    def forward(ctx, part, zero3, p):
        ctx.zero3, ctx.p = zero3, p
        return zero3.gather_one(p, part)

    @staticmethod
    def backward(ctx, grad):
        return ctx.zero3.scatter_mean(ctx.p, grad), None, None


class _GatherInto(torch.autograd.Function):
    """Like :class:`_GatherPart` from a shard in the module's dtype (``ds_tensor``: the values
    ZeRO-3 itself gathers); backward: the gradient's part of the rank-average, in fp32, added
    to ``acc`` (returns none: the shard gets no ``.grad``)."""

    @staticmethod
    def forward(ctx, part, zero3, p, acc):
        ctx.zero3, ctx.p, ctx.acc = zero3, p, acc
        return zero3.gather_one(p, part)

    @staticmethod
    def backward(ctx, grad):
        ctx.acc.add_(ctx.zero3.scatter_mean(ctx.p, grad.float()))
        return None, None, None, None


class _PartitionedBackward:
    """``Engine.partitioned_backward`` at ZeRO-3: each module's forward reads its parameters
    gathered from the shards (:class:`_GatherInto`); ``backward(loss)`` adds the gradient to
    ``grads`` (fp32, this rank's parts, rank-averaged). Memory: ``grads`` (1/world of an fp32
    student) and one module's parameters and gradients at a time."""

    def __init__(self, zero3):
        self.zero3 = zero3
        self.params = zero3.s.params()
        # the shards as leaves (aliases, no copy), so that the gathers have a backward
        self.leaves = [p.ds_tensor.detach().requires_grad_() for p in self.params]
        self.grads = Sharded(
            torch.zeros(p.ds_tensor.ds_numel, dtype=torch.float32, device=p.ds_tensor.device)
            for p in self.params
        )
        self.live: dict = {}

    def form(self, i):
        p, leaf = self.params[i], self.leaves[i]
        work = _GatherInto.apply(leaf, self.zero3, p, self.grads[i])
        part = leaf.detach()
        self.live[work.untyped_storage().data_ptr()] = (
            weakref.ref(work),
            lambda: self.zero3.gather_flat(p, part),
        )
        return work

    formed: set  # the parameter indices formed so far (set by partitioned_backward)

    def backward(self, loss: torch.Tensor) -> None:
        torch.autograd.grad(loss, self.leaves, allow_unused=True)
        self.live.clear()


_REGATHER = object()  # marks a packed recipe in _regathered


@contextlib.contextmanager
def _regathered(live: dict):
    """Within the block, a tensor the autograd graph saves that shares storage with a live
    gathered parameter in ``live`` (address -> (weakref, re-gather)) is saved as a recipe
    (re-gather, size, stride, offset) and gathered again when the backward needs it: the
    graph holds no full parameter (ZeRO-3's own hooks do the same for its parameters)."""

    def pack(t):
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            return t
        hit = live.get(t.untyped_storage().data_ptr())
        if hit is None or hit[0]() is None:
            return t
        return (_REGATHER, hit[1], t.size(), t.stride(), t.storage_offset())

    def unpack(x):
        if isinstance(x, tuple) and x and x[0] is _REGATHER:
            _, again, size, stride, offset = x
            return again().as_strided(size, stride, offset)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
