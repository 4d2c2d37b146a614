"""The engine interface the algorithm talks to, and its plain-PyTorch implementation.

An engine owns one model and its optimizer (and schedule, clipping, accumulation). The LGTM step
(``lgtm_ds.methods``) only calls the methods below, so it runs unchanged on a plain module
(:class:`TorchEngine`, for notebooks and CPU tests) and on a DeepSpeed engine
(``lgtm_ds.engines.deepspeed``). Two protocols: :class:`Engine` (both roles: the training API,
and the teacher's side of a low-precision influence term) and :class:`InfluencePasses` (the
student: look-ahead and forwards at other parameter values).

Student-side influence passes never write into the engine's parameters: the look-ahead and the
``theta +- R v`` forwards run the module functionally (``torch.func.functional_call``) on fp32
work tensors, so the student's parameters after the influence passes are bit-identical to
before by construction, in fp32 and bf16 alike, and a bf16 student still *sees* ``R v``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import lgtm_kernels
import torch
from torch import nn
from torch.func import functional_call

from ..errors import ConfigError
from .head import HeadOutput, head_mode

_NOT_INPUTS = frozenset({"labels", "source_index"})  # source_index: tasks.base.SOURCE_INDEX


def model_inputs(batch: dict) -> dict:
    """The batch minus ``labels`` and ``source_index``: models are called as
    ``model(**inputs)``, losses are ours and the row indices are the telemetry's."""
    return {k: v for k, v in batch.items() if k not in _NOT_INPUTS}


def get_logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


@dataclass
class AdamState:
    """The student optimizer's AdamW state, as full fp32 tensors aligned with ``params()``.

    ``exp_avg`` / ``exp_avg_sq`` are None before the first step. Hyper-parameters are per tensor
    because parameter groups may differ (weight decay off for biases and norms).
    """

    exp_avg: list[torch.Tensor] | None
    exp_avg_sq: list[torch.Tensor] | None
    step: int  # optimizer steps taken so far
    lr: list[float]
    betas: list[tuple[float, float]]
    eps: list[float]
    weight_decay: list[float]


class Sharded(list):
    """A student-sized list (``g``, the look-ahead, ``v``, ``theta``) held as this rank's parts
    only: per trainable parameter, the flat elements of the engine's partition of it (ZeRO-3:
    rank r holds ``flat[r n:(r + 1) n]``, ``n = ds_tensor.ds_numel``, the tail zero-padded).
    Returned by engines that partition their parameters when asked (``sharded=True``); the
    engine's influence passes take it wherever they take a full list, and gather module by
    module what one forward needs. A reduced gradient in this form is already rank-averaged."""


class Engine:
    """What one role (teacher or student) must provide to the distillation algorithms."""

    module: nn.Module
    gradient_accumulation_steps: int = 1
    # decoders: forwards return a HeadOutput (hidden states + output layer) instead of logits,
    # so that the task forms the logits chunk by chunk (engines/head.py); set by the trainer
    fused_head: bool = False
    # built without an optimizer: the role never steps (a frozen teacher)
    frozen: bool = False

    def head_ctx(self):
        """The block in which the module's forward returns a HeadOutput (when ``fused_head``)."""
        return head_mode(self.module) if self.fused_head else contextlib.nullcontext()

    # -- ordinary training -------------------------------------------------------------------
    def forward(self, batch: dict) -> torch.Tensor:
        """Train-mode forward with graph; returns logits."""
        raise NotImplementedError

    def raw_forward(self, batch: dict) -> torch.Tensor:
        """The module's own forward (no engine bookkeeping, gradient hooks not involved)."""
        with self.head_ctx():
            return get_logits(self.module(**model_inputs(batch)))

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients of ``loss`` (the engine divides by the accumulation steps)."""
        raise NotImplementedError

    def step(self) -> None:
        """Called once per micro-batch; steps optimizer + schedule at accumulation boundaries."""
        raise NotImplementedError

    def lr(self) -> float:
        """The learning rate the next optimizer step applies (first param group)."""
        raise NotImplementedError

    @property
    def step_skipped(self) -> bool:
        """True if the last boundary step was skipped: a non-finite gradient (or an fp16
        overflow) left the parameters and the optimizer state as they were."""
        return False

    def params(self) -> list[torch.Tensor]:
        """Trainable parameters as the forward reads them (full tensors)."""
        return [p for p in self.module.parameters() if p.requires_grad]

    def all_reduce_mean_(self, tensors: list[torch.Tensor]) -> None:
        """Average tensors over data-parallel ranks, in place (no-op on one process, and on a
        :class:`Sharded` gradient, which is reduced already)."""

    @contextlib.contextmanager
    def generation_params(self, gather: bool = True) -> Iterator[bool]:
        """The block in which a generation backend runs the module's forwards. Yields whether
        each forward is a collective across ranks (ZeRO-3 with per-forward gathers: every rank
        must keep stepping until all have finished). An engine that partitions its parameters
        gathers them once for the block when ``gather`` (full on every rank for its duration),
        else per forward. Here: nothing to gather, forwards are local."""
        yield False

    # -- teacher: the influence term's gradient, kept apart from the main term -----------------
    @property
    def split_influence_backward(self) -> bool:
        """True when a single low-precision backward would round the (tiny) influence term of
        dL/dz away: the algorithm then backpropagates it separately and calls
        :meth:`add_grads_` before the boundary step."""
        return False

    def add_grads_(self, grads: list[torch.Tensor]) -> None:
        """Add (rank-local) ``grads`` to the accumulated gradients, before the boundary step."""
        raise NotImplementedError

    @property
    def reuses_graph_for_influence(self) -> bool:
        """Whether :meth:`unhooked` offers the forward's graph (split influence backward)."""
        return False

    def unhooked(self, z):
        """For an output ``z`` of :meth:`forward`: the same values on the same graph, but
        upstream of anything the engine hooked on the output, so that a backward from it
        (``torch.autograd.grad``, graph retained) leaves the engine's state alone and the
        ordinary backward of ``z`` still follows. None where the engine cannot offer one: the
        caller then runs a separate forward (:meth:`raw_forward`)."""
        return None


class InfluencePasses(Engine):
    """What the student's engine adds for the influence passes (LGTM's steps A-D, MetaDistil's
    pilot): its fp32 masters and optimizer state, the simulated look-ahead, and forwards and
    gradients at other parameter values, none of which touches the engine's parameters,
    gradients or hooks. Here: on the full tensors of a plain module (:class:`TorchEngine`);
    the DeepSpeed student engine does the same on its ZeRO state and partitions. A teacher's
    engine need not implement it."""

    def master_params(self, sharded: bool = False) -> list[torch.Tensor]:
        """fp32 values of ``params()`` (the masters in mixed precision; the params in fp32).
        ``sharded``: a :class:`Sharded` view of this rank's master partitions where the engine
        partitions its parameters (ZeRO-3; no copy), else the full tensors."""
        return [
            p.detach() if p.dtype in (torch.float32, torch.float64) else p.detach().float()
            for p in self.params()
        ]

    def adam_state(self) -> AdamState:
        raise NotImplementedError

    def lookahead(
        self,
        theta: list[torch.Tensor],
        g: list[torch.Tensor],
        step_fn,
        reuse_g: bool = False,
        sharded: bool = False,
    ):
        """LGTM's step B, ``theta + AdamW_update(g)`` as full fp32 tensors: ``step_fn(params,
        grads, AdamState, out=None)`` (``methods.lookahead.adamw_lookahead``, elementwise) on
        whatever this engine holds. Here: on the full tensors. ZeRO-1/2/3 (the DeepSpeed
        adapter): on this rank's partitions of the moments, then one all-gather of the result.
        ``reuse_g``: the caller is done with ``g``; its memory may hold the result (one full
        fp32 copy of the student fewer here and at ZeRO-3). ``theta`` None: this engine's own
        masters (ZeRO-1/2/3: only this rank's partitions of them are read). ``sharded``: the
        result as a :class:`Sharded` list where the engine partitions its parameters (ZeRO-3:
        no gather), else full tensors."""
        theta = self.master_params() if theta is None else theta
        return step_fn(theta, g, self.adam_state(), out=g if reuse_g else None)

    def functional_forward(self, params: list[torch.Tensor], batch: dict) -> torch.Tensor:
        """Forward with ``params`` in place of ``params()`` (any dtype; fp32 for bf16 models)."""
        names = self._param_names()
        with self.head_ctx():
            return get_logits(
                functional_call(
                    self.module,
                    dict(zip(names, params)),
                    args=(),
                    kwargs=model_inputs(batch),
                    strict=False,
                )
            )

    def forward_at(self, params: list[torch.Tensor], batch: dict) -> torch.Tensor:
        """No-grad forward of the module as if its parameters were ``params`` (full tensors)."""
        with torch.no_grad():
            return self.functional_forward(params, batch)

    def forward_perturbed(
        self, theta: list[torch.Tensor], v: list[torch.Tensor], alpha: float, batch: dict
    ) -> torch.Tensor:
        """No-grad forward at ``theta + alpha * v`` (LGTM's step D, fp32 work tensors). Each
        module's parameters are formed just before its own forward and dropped after it, so the
        extra memory is one module's parameters (plus what the output keeps: a fused head's
        weight), not a full copy of the student. Bit for bit :meth:`forward_at` on
        ``theta + alpha v``. A model that reads a parameter outside its own module's forward
        (or never reads one) is found on the first call and runs on full work tensors from
        then on (the first call is repeated with the same RNG state)."""

        def form(i):
            work = torch.empty_like(theta[i])
            _axpy([work], [theta[i]], [v[i]], alpha)
            return work

        return self._forward_formed(form, batch)

    _perturb_lazily: bool | None = None  # None: not known yet (set by the first call)

    def _forward_formed(self, form, batch: dict) -> torch.Tensor:
        """No-grad forward in which trainable parameter ``i`` is ``form(i)``, formed module by
        module (:meth:`_per_module`), or on the full list ``[form(i) for all i]`` for a model
        that reads a parameter outside its own module's forward (see
        :meth:`forward_perturbed`)."""
        n = len(self.params())
        if self._perturb_lazily is not False:
            rng = torch.get_rng_state()
            cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
            cuda_rng = torch.cuda.get_rng_state() if cuda else None
            with torch.no_grad(), self._per_module(form) as formed, self.head_ctx():
                out = get_logits(self.module(**model_inputs(batch)))
            if len(formed) == n:
                self._perturb_lazily = True
                return out
            self._perturb_lazily = False
            _log.info(
                "%s: a parameter is read outside its module's forward; the perturbed forwards "
                "run on full work tensors (one fp32 copy of the model)",
                getattr(self, "role", "model"),
            )
            del out
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng)
        with torch.no_grad():  # (not forward_at: an engine may wrap both in one context)
            work = [form(i) for i in range(n)]
            return self.functional_forward(work, batch)

    @contextlib.contextmanager
    def _per_module(self, form):
        """Within the block, each module that owns trainable parameters reads parameter ``i``
        as ``form(i)`` during its forward: formed by a pre-forward hook, dropped by the
        forward hook (tied parameters in every owner; a module called twice forms them twice;
        a backward that recomputes a forward, activation checkpointing, forms them again).
        Yields the set of the indices formed so far."""
        index = {id(p): i for i, p in enumerate(self.params())}
        slots = {}  # module -> [(attribute, parameter index)], tied parameters in every owner
        for mod in self.module.modules():
            own = [(k, index[id(p)]) for k, p in dict.items(mod._parameters) if id(p) in index]
            if own:
                slots[mod] = own
        formed, stash, handles = set(), {}, []

        def pre(mod, args):
            saved = []
            for attr, i in slots[mod]:
                work = form(i)
                # the dict's own read: a ZeRO-3 module's getter would gather the parameter
                saved.append((attr, dict.__getitem__(mod._parameters, attr)))
                mod._parameters[attr] = work  # the module reads it as its parameter
                formed.add(i)
            stash.setdefault(mod, []).append(saved)
            # fp32 work tensors in a module whose input comes from a frozen low-precision base
            # (LoRA adapters on a bf16 model): the input in the work tensors' dtype, as a module
            # of one dtype computes (peft casts the adapters' output back to the base's dtype).
            # A model trained in full sees no such input: its activations are fp32 throughout.
            dtype = work.dtype
            if any(_floating(a) and a.dtype != dtype for a in args):
                return tuple(a.to(dtype) if _floating(a) else a for a in args)
            return None

        def post(mod, args, out):
            for attr, param in stash[mod].pop():
                mod._parameters[attr] = param

        try:
            for mod in slots:
                handles.append(mod.register_forward_pre_hook(pre))
                handles.append(mod.register_forward_hook(post))
            yield formed
        finally:
            for h in handles:
                h.remove()
            for mod, frames in stash.items():  # an exception inside a forward: put them back
                for saved in reversed(frames):
                    for attr, param in saved:
                        mod._parameters[attr] = param

    def jvp_at(
        self, params: list[torch.Tensor], tangents: list[torch.Tensor], batch: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f(x; params), d/de f(x; params + e * tangents) at e = 0)``: the logits and their
        exact directional derivative (forward-mode AD, ``torch.func.jvp``), no graph kept.
        With ``fused_head`` both are :class:`HeadOutput` s (hidden states and output-layer
        parameters, and their tangents: the logits' tangent is ``hidden' W^T + hidden W'^T +
        b'``), no full logits. Attention runs on the math kernel (the fused CPU/CUDA attention
        kernels have no forward-mode rule). Dropout draws from the RNG as one ordinary forward
        does."""
        from torch.func import jvp
        from torch.nn.attention import SDPBackend, sdpa_kernel

        names = self._param_names()
        inputs = model_inputs(batch)
        fused = self.fused_head

        def f(*ps):
            out = get_logits(
                functional_call(
                    self.module, dict(zip(names, ps)), args=(), kwargs=inputs, strict=False
                )
            )
            if not fused:
                return out
            # a tuple of tensors for torch.func (a HeadOutput is a dict subclass)
            bias = out.bias if out.bias is not None else out.hidden.new_zeros(0)
            return out.hidden, out.weight, bias

        with (
            torch.no_grad(),
            sdpa_kernel([SDPBackend.MATH]),
            _torch_linear(),
            _no_activation_checkpointing(self.module),
            self.head_ctx(),
        ):
            primal, tangent = jvp(
                f, tuple(p.detach() for p in params), tuple(t.detach() for t in tangents)
            )
        if not fused:
            return primal, tangent
        return tuple(HeadOutput(h, w, b if b.numel() else None) for h, w, b in (primal, tangent))

    def grad_at(
        self, params: list[torch.Tensor], batches: list[dict], loss_fn
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``sum_j grad loss_fn(f(x_j; params), x_j) / len(batches)`` at ``params`` (full tensors),
        and the mean loss. Not averaged over ranks.

        The module runs with ``params`` swapped in for the forward *and* the backward: with
        activation checkpointing the backward recomputes activations, and a swap that ended
        with the forward (``functional_call``) would recompute them at the module's own
        parameters (measured: LGTM's teacher update 1.2e-4 off after 2 steps in float64)."""
        from torch.nn.utils.stateless import _reparametrize_module

        leaves = [p.detach().requires_grad_() for p in params]
        grads = None  # the first batch's gradients are the accumulator (no zeros + copy)
        total = 0.0
        swap = dict(zip(self._param_names(), leaves))
        for b in batches:
            with (
                _reparametrize_module(self.module, swap, tie_weights=True, strict=False),
                self.head_ctx(),
            ):
                loss = loss_fn(get_logits(self.module(**model_inputs(b))), b)
                gs = torch.autograd.grad(loss / len(batches), leaves, allow_unused=True)
                grads = accumulate_grads(grads, gs, leaves)
                del gs
            total += loss.detach()
        if grads is None:  # no batch
            grads = [torch.zeros_like(x) for x in leaves]
        return grads, total / max(len(batches), 1)

    @contextlib.contextmanager
    def partitioned_backward(self):
        """A block of forwards and backwards whose parameter gradients land on this rank's
        partitions: yields an object with ``backward(loss)`` (the gradient of ``loss`` with
        respect to ``params()``, added to its ``grads``, a rank-averaged fp32
        :class:`Sharded` list) where the engine partitions its parameters (ZeRO-3), else
        None (the caller takes ``torch.autograd.grad`` of full tensors). The engine's own
        gradients and hooks are not involved."""
        yield None

    def accept_partitions(self, pb, error: Exception | None = None) -> bool:
        """After a step A under :meth:`partitioned_backward` (``pb``), or the ``error`` it
        raised: True to keep its result. False when this model cannot run on partitions (a
        trainable parameter was never formed in its module's forward: read outside it, or not
        read; or the first partitioned pass raised): the caller repeats step A without, and
        from then on every pass runs on full tensors. Raises ``error`` where partitions had
        been settled already (a real error)."""
        if error is not None:
            raise error
        return True

    def sq_norm(self, tensors: list[torch.Tensor]) -> float:
        """``sum ||t||^2`` over a parameter-aligned list, in float64 (a :class:`Sharded` list:
        over every rank's parts; the same value on every rank)."""
        return float(sum((t.double() ** 2).sum() for t in tensors))

    def _param_names(self) -> list[str]:
        if not hasattr(self, "_names_cache"):
            self._names_cache = [n for n, p in self.module.named_parameters() if p.requires_grad]
        return self._names_cache


def _floating(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


@contextlib.contextmanager
def _no_activation_checkpointing(module: nn.Module):
    """Hugging Face activation checkpointing off for the block (a forward-mode pass keeps no
    graph, so there is nothing to save, and checkpointing cannot run inside ``torch.func``)."""
    on = [m for m in module.modules() if getattr(m, "gradient_checkpointing", False) is True]
    # the input-embedding hook transformers adds with checkpointing (requires_grad_ on the
    # embeddings' output) is not allowed inside torch.func either
    hooked = hasattr(module, "_require_grads_hook")
    for m in on:
        m.gradient_checkpointing = False
    if hooked:
        module.disable_input_require_grads()
    try:
        yield
    finally:
        for m in on:
            m.gradient_checkpointing = True
        if hooked:
            module.enable_input_require_grads()


@contextlib.contextmanager
def _torch_linear():
    """``torch.nn.functional.linear`` as torch ships it, for the block. A ZeRO-3 engine in the
    process replaces it with an autograd Function without a forward-mode rule (DeepSpeed's
    memory-efficient linear), which ``torch.func.jvp`` cannot run through."""
    import torch.nn.functional as F

    current = F.linear
    F.linear = torch._C._nn.linear
    try:
        yield
    finally:
        F.linear = current


class TorchEngine(InfluencePasses):
    """A plain module + torch optimizer (+ optional scheduler), with accumulation and clipping.

    Mirrors a DeepSpeed engine's contract: ``backward`` divides by the accumulation steps,
    ``step`` is called every micro-batch and only steps at the boundary.
    """

    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        scheduler=None,
        *,
        gradient_accumulation_steps: int = 1,
        max_grad_norm: float = 0.0,
    ):
        self.module = module
        self.optimizer = optimizer
        self.frozen = optimizer is None
        self.scheduler = scheduler
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.micro_steps = 0
        self.global_steps = 0

    def forward(self, batch: dict) -> torch.Tensor:
        with self.head_ctx():
            return get_logits(self.module(**model_inputs(batch)))

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.gradient_accumulation_steps).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.gradient_accumulation_steps:
            return
        if self.optimizer is None:
            raise RuntimeError("this engine has no optimizer (frozen role)")
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params(), self.max_grad_norm)
        self.optimizer.step()  # guard_nonfinite_: skipped (overflow=True) on a non-finite gradient
        self._skipped = bool(getattr(self.optimizer, "overflow", False))
        if self.scheduler is not None and not self._skipped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_steps += 1

    @property
    def step_skipped(self) -> bool:
        return getattr(self, "_skipped", False)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def adam_state(self) -> AdamState:
        return adam_state_from_torch(self.optimizer, self.params())


def adam_state_from_torch(
    optimizer: torch.optim.Optimizer, params: list[torch.Tensor]
) -> AdamState:
    """Read a torch Adam/AdamW optimizer's state for ``params`` without changing it."""
    if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        raise ConfigError(
            f"the LGTM look-ahead simulates Adam/AdamW; the student optimizer is "
            f"{type(optimizer).__name__}"
        )
    group_of = {}
    for g in optimizer.param_groups:
        if g.get("amsgrad", False):
            raise ConfigError("the LGTM look-ahead does not support amsgrad=True")
        for p in g["params"]:
            group_of[id(p)] = g
    if any(id(p) not in group_of for p in params):
        raise ConfigError("a trainable student parameter is not in the student optimizer")
    decoupled = isinstance(optimizer, torch.optim.AdamW)
    if not decoupled and any(group_of[id(p)]["weight_decay"] for p in params):
        raise ConfigError("the look-ahead supports Adam without weight decay, or AdamW")
    hparams = adam_hparams(params, group_of, decoupled)
    m, v, steps = [], [], set()
    for p in params:
        st = optimizer.state.get(p, {})
        if "exp_avg" in st:
            m.append(st["exp_avg"])
            v.append(st["exp_avg_sq"])
            steps.add(int(st["step"]))
    if m and len(m) != len(params):
        raise RuntimeError("some student parameters have optimizer state and some do not")
    if len(steps) > 1:
        raise RuntimeError(f"student parameters disagree on the optimizer step count: {steps}")
    return AdamState(m or None, v or None, steps.pop() if steps else 0, *hparams)


def adam_hparams(params: list[torch.Tensor], group_of: dict[int, dict], decoupled: bool):
    """Per-parameter (lr, betas, eps, weight_decay) lists from each parameter's optimizer group
    (``group_of``: ``id(param) -> param_group``); weight decay is 0 unless ``decoupled``."""
    lr, betas, eps, wd = [], [], [], []
    for p in params:
        g = group_of[id(p)]
        lr.append(float(g["lr"]))
        betas.append(tuple(float(b) for b in g["betas"]))
        eps.append(float(g["eps"]))
        wd.append(float(g["weight_decay"]) if decoupled else 0.0)
    return lr, betas, eps, wd


_log = logging.getLogger(__name__)


def accumulate_grads(acc, grads, leaves) -> list[torch.Tensor]:
    """``acc += grads`` (``acc`` None: the first batch's gradients become the accumulator, no
    zeros + copy). A None gradient, a parameter the loss does not use (a projection), counts
    as zeros; the accumulator is contiguous (autograd may return an expanded view, e.g. the
    gradient of ``p.sum()``, which cannot accumulate in place)."""
    if acc is None:
        return [torch.zeros_like(x) if g is None else g.contiguous() for x, g in zip(leaves, grads)]
    for a, g in zip(acc, grads):
        if g is not None:
            a.add_(g)
    return acc


def _axpy(out: list[torch.Tensor], x: list[torch.Tensor], v: list[torch.Tensor], a: float) -> None:
    """``out = x + a * v`` over lists: ``lgtm_kernels.perturb_`` from the fp32 source (one launch
    on CUDA); fp64 (the test oracle) elementwise in fp64."""
    if all(o.dtype == torch.float32 for o in out):
        lgtm_kernels.perturb_(out, v, a, source=x)
        return
    for o, xi, vi in zip(out, x, v):
        torch.add(xi, vi, alpha=a, out=o)
