"""DeepSpeed engines for the teacher and the student, behind the :class:`Engine` interface.

This is the only module that touches DeepSpeed (process group, initialisation, ZeRO partitions,
fp32 masters, optimizer state, gathers); everything else calls the functions below.
``build_engine`` is the one place that calls ``deepspeed.initialize``, once per role, each with
its own config dict (DeepSpeed-Chat's ``rlhf_engine.py`` shape); ``lgtm_ds.engines.build``
assembles both roles.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import warnings
import weakref

import torch

from ..errors import ConfigError
from .base import (
    AdamState,
    Engine,
    Sharded,
    _axpy,
    accumulate_grads,
    adam_hparams,
    adam_state_from_torch,
    get_logits,
    model_inputs,
)
from .head import HeadOutput, swap_forward

_log = logging.getLogger(__name__)

# torch 2.13 marks the reduce-scatter DeepSpeed's comm calls as deprecated (one warning per rank)
warnings.filterwarnings(
    "ignore", message=r".*reduce_scatter_tensor. is deprecated", category=FutureWarning
)


def init_distributed(timeout_s: float = 600.0) -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU). Returns (rank, world)."""
    import deepspeed

    if "RANK" not in os.environ:  # plain `python launch/train.py`: a one-process group
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    # note: the timeout turns a collective hang (e.g. mismatched steps across ranks) into an error
    deepspeed.init_distributed(timeout=datetime.timedelta(seconds=timeout_s), verbose=False)
    import deepspeed.comm as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    _unlink_shm_buffer(rank, world)
    return rank, world


def shm_buffer_path(rank: int) -> str:
    """The file DeepSpeed's CPU shared-memory all-reduce creates for ``rank`` of the group that
    ``MASTER_ADDR``/``MASTER_PORT`` name (its naming, ops/csrc/cpu/comm/shm.cpp)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def _unlink_shm_buffer(rank: int, world: int) -> None:
    """DeepSpeed's CPU backend creates a 66 MB /dev/shm file per rank when all ranks share a
    node (for its inference all-reduce; training never calls it) and never unlinks it (known
    upstream, deepspeedai/DeepSpeed#4115): every launch left 66 MB of RAM per rank behind. On
    the dev machine a day of test runs left 308 files, 20 GB of its 24 GB, and the next CI run
    hung. Each rank maps every peer's file during init, so once all ranks are past init (the
    barrier) each unlinks its own: the mappings stay valid, and the memory is freed when the
    processes exit, however they exit."""
    if world > 1:  # every rank, file or not: a barrier only some ranks enter would hang
        import deepspeed.comm as dist

        dist.barrier()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(shm_buffer_path(rank))


def set_log_level(level: int) -> None:
    """DeepSpeed's logger at ``level`` (a ``logging`` level). At WARNING or above on a machine
    without CUDA, the accelerator is named (``DS_ACCELERATOR=cpu``, unless set) so that DeepSpeed
    does not warn that it guessed it. Call before DeepSpeed is first imported."""
    import logging

    if level >= logging.WARNING and "DS_ACCELERATOR" not in os.environ:
        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
    from deepspeed.utils import logger

    logger.setLevel(level)


def shutdown_distributed() -> None:
    """Barrier, then tear the process group down before the interpreter exits.

    Without it a rank that finishes first can abort at exit ("terminate called without an
    active exception": a communication thread still joinable), and the launcher then reports a
    failed run although every output was written. Seen once in ~10 two-rank CPU runs.
    """
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        try:
            tdist.barrier()
        finally:
            tdist.destroy_process_group()


def barrier() -> None:
    """All ranks wait here (no-op on one process)."""
    import deepspeed.comm as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_gather_object(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (pickled; a collective: every rank calls it)."""
    import deepspeed.comm as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def build_engine(model: torch.nn.Module, optimizer, scheduler, ds_config: dict, role: str):
    """``deepspeed.initialize`` for one role, with a client optimizer and LR scheduler."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return DeepSpeedEngineAdapter(engine, role)


class DeepSpeedEngineAdapter(Engine):
    def __init__(self, engine, role: str):
        self.engine = engine
        self.role = role
        self.module = engine.module
        self.gradient_accumulation_steps = int(engine.gradient_accumulation_steps())
        self.stage = int(engine.zero_optimization_stage())
        basic = engine.basic_optimizer
        if engine.optimizer is not basic and hasattr(basic, "check_finite"):
            # ZeRO-1/2/3 and the bf16/fp16 wrappers skip non-finite steps themselves (checked
            # on every rank: all CPU/gloo paths, ZeRO 0-3 x fp32/bf16); the client AdamW's guard
            # checks only where it is the engine's optimizer (ZeRO-0 fp32)
            basic.check_finite = False

    # -- ordinary training -------------------------------------------------------------------
    def forward(self, batch: dict) -> torch.Tensor:
        # fused head: a HeadOutput is a dict of tensors, which DeepSpeed's engine forward hooks
        # as it hooks logits, so the engine's backward prologue runs for this graph too
        with self.head_ctx(), self._aliased_output():
            return get_logits(self.engine(**model_inputs(batch)))

    @property
    def reuses_graph_for_influence(self) -> bool:
        return self._keeps_unhooked

    @property
    def _keeps_unhooked(self) -> bool:
        # bf16 ZeRO-2 teachers: the influence backward reuses the forward's graph. ZeRO-3's
        # module hooks gather a module's parameters once per forward for one backward (a
        # reference count): a second backward through the graph would find them released.
        return self.split_influence_backward and self.stage < 3

    @contextlib.contextmanager
    def _aliased_output(self):
        """With :attr:`_keeps_unhooked`: the module's output tensors (logits, or a HeadOutput's)
        leave its forward as aliases (``view_as``), which the engine hooks; the originals ride
        along on the output (``lgtm_unhooked``) for :meth:`unhooked`. (Any bf16 engine; only
        the teacher's are used.)"""
        if not self._keeps_unhooked:
            yield
            return
        module, inner = self.module, self.module.forward

        def forward(*args, **kwargs):
            out = inner(*args, **kwargs)
            if isinstance(out, HeadOutput):
                raw = out
                out = HeadOutput(
                    raw.hidden.view_as(raw.hidden),
                    raw.weight.view_as(raw.weight),
                    raw.bias.view_as(raw.bias) if raw.bias is not None else None,
                    raw.weight_param,
                    raw.bias_param,
                )
                out.lgtm_unhooked = raw
                return out
            raw = get_logits(out)
            alias = raw.view_as(raw)
            alias.lgtm_unhooked = raw
            if hasattr(out, "logits"):
                out["logits"] = alias  # a ModelOutput: item and attribute
                return out
            return alias

        with swap_forward(module, forward):
            yield

    def unhooked(self, z):
        return getattr(z, "lgtm_unhooked", None)

    def raw_forward(self, batch: dict) -> torch.Tensor:
        # ZeRO-3 included: the module's own hooks gather the parameters
        with self.head_ctx():
            return get_logits(self.module(**model_inputs(batch)))

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    @property
    def step_skipped(self) -> bool:
        # ZeRO-0 fp32: DeepSpeed reads the guarded AdamW's overflow (skipped_steps, no LR step)
        return not self.engine.was_step_applied()

    @property
    def global_steps(self) -> int:
        return int(self.engine.global_steps)

    # -- influence passes ----------------------------------------------------------------------
    @property
    def module_dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def master_params(self, sharded: bool = False) -> list[torch.Tensor]:
        if sharded and self._shards:
            return self._sharded_masters()
        params = self.params()
        if self.stage < 3 and all(p.dtype == torch.float32 for p in params):
            # ZeRO-0/1/2 in fp32: the module's params hold the master values (every rank).
            return [p.detach() for p in params]
        views = _fp16_optimizer_views(self.engine.optimizer, params)
        if views is not None:  # ZeRO-0 + bf16/fp16: full fp32 flat masters on every rank
            return [views[id(p)][0].view_as(p) for p in params]
        if self.stage in (1, 2):
            return self._zero12_gather(None)
        # ZeRO-3: this rank's fp32 partition of every parameter, one all-gather for them all
        import deepspeed.comm as dist
        from deepspeed.utils import safe_get_local_fp32_param

        local = {}
        for i, p in enumerate(params):
            n = p.ds_tensor.ds_numel
            lo = dist.get_rank(group=p.ds_process_group) * n
            k = max(0, min(n, p.ds_numel - lo))
            local[i] = safe_get_local_fp32_param(p).detach().reshape(-1)[:k]
        return self._gather_parts(local, torch.float32, local[0].device)

    def adam_state(self) -> AdamState:
        basic = self.engine.basic_optimizer
        params = self.params()
        if self.engine.optimizer is basic:  # ZeRO-0, fp32: the torch optimizer sees our params
            return adam_state_from_torch(basic, params)
        state = self._adam_meta()
        if state.step == 0:
            return state
        opt = self.engine.optimizer
        views = _fp16_optimizer_views(opt, params)
        if views is not None:
            m, v = [], []
            for p in params:
                _, flat, lo, hi = views[id(p)]
                m.append(basic.state[flat]["exp_avg"].view(-1)[lo:hi].view_as(p))
                v.append(basic.state[flat]["exp_avg_sq"].view(-1)[lo:hi].view_as(p))
        elif self.stage in (1, 2):
            m, v = self._zero12_gather("exp_avg"), self._zero12_gather("exp_avg_sq")
        else:
            from deepspeed.utils import safe_get_full_optimizer_state

            _link_moments(opt, basic)
            # note: collectives, one per tensor and moment
            m = [safe_get_full_optimizer_state(p, "exp_avg") for p in params]
            v = [safe_get_full_optimizer_state(p, "exp_avg_sq") for p in params]
        return dataclasses.replace(state, exp_avg=m, exp_avg_sq=v)

    def _adam_meta(self) -> AdamState:
        """The wrapped optimizer's step count and per-parameter hyper-parameters (no moments)."""
        basic = self.engine.basic_optimizer
        params = self.params()
        if not isinstance(basic, torch.optim.Adam | torch.optim.AdamW):
            raise ConfigError(
                f"the LGTM look-ahead simulates Adam/AdamW; the student's optimizer "
                f"is {type(basic).__name__}"
            )
        opt = self.engine.optimizer
        lp_groups = (
            getattr(opt, "bit16_groups", None)
            or getattr(opt, "bf16_groups", None)
            or getattr(opt, "fp16_groups", None)
        )
        if lp_groups is None or len(lp_groups) != len(basic.param_groups):
            raise RuntimeError(f"unsupported DeepSpeed optimizer wrapper {type(opt).__name__}")
        group_of = {id(p): basic.param_groups[i] for i, grp in enumerate(lp_groups) for p in grp}
        hparams = adam_hparams(params, group_of, isinstance(basic, torch.optim.AdamW))
        steps = {int(s["step"]) for s in basic.state.values() if "step" in s}
        if len(steps) > 1:
            raise RuntimeError(f"student optimizer partitions disagree on the step count: {steps}")
        return AdamState(None, None, steps.pop() if steps else 0, *hparams)

    def lookahead(self, theta, g, step_fn, reuse_g=False, sharded=False):
        """ZeRO-1/2/3: the simulated AdamW step on this rank's partitions of the moments (no
        gathered copies of them: two full fp32 copies of the student fewer, and under ZeRO-3
        no collective per tensor and moment), then an all-gather of the result in
        ~:attr:`GATHER_BUCKETS` pieces (ZeRO-1/2: the result views of one buffer per parameter
        group; ZeRO-3 with ``reuse_g``: copied into ``g``). ``g`` (and ``theta``, when given)
        are full and equal on every rank; ``reuse_g``: this rank's part of the result is
        written into ``g`` too. ZeRO-3 with ``sharded``: no gather, this rank's part as a
        :class:`Sharded` list."""
        if self.engine.optimizer is self.engine.basic_optimizer or self.stage == 0:
            return super().lookahead(theta, g, step_fn, reuse_g)
        meta = self._adam_meta()
        if sharded and self._shards:
            return self._sharded_lookahead(theta, g, step_fn, reuse_g, meta)
        if meta.step == 0:  # no moments yet: nothing to gather
            theta = self.master_params() if theta is None else theta
            return step_fn(theta, g, meta, out=g if reuse_g else None)
        parts = self._moment_parts()
        idx = [i for i, part in enumerate(parts) if part is not None]
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        flat = lambda t, i: t.reshape(-1).narrow(0, parts[i][0], parts[i][1])  # noqa: E731
        if theta is None:  # this rank's own fp32 masters: no gathered copy
            masters = self._master_parts()
            source = [masters[i] for i in idx]
        else:
            source = [flat(theta[i], i) for i in idx]
        g_parts = [flat(g[i], i) for i in idx]
        local = step_fn(
            source,
            g_parts,
            AdamState(
                [parts[i][2] for i in idx],
                [parts[i][3] for i in idx],
                meta.step,
                *(pick(h) for h in (meta.lr, meta.betas, meta.eps, meta.weight_decay)),
            ),
            out=g_parts if reuse_g else None,  # this rank's part of the result, in g's place
        )
        into = g if reuse_g and self.stage == 3 else None
        return self._gather_parts(dict(zip(idx, local)), torch.float32, g[0].device, into)

    def _master_parts(self) -> list[torch.Tensor | None]:
        """Per trainable parameter: this rank's fp32 master elements, laid out as
        :meth:`_moment_parts` says (flat views; None where it holds none)."""
        import deepspeed.comm as dist

        out = []
        for p in self.params():
            if self.stage == 3:
                from deepspeed.utils import safe_get_local_fp32_param

                n = p.ds_tensor.ds_numel
                lo = dist.get_rank(group=p.ds_process_group) * n
                k = max(0, min(n, p.ds_numel - lo))
                out.append(safe_get_local_fp32_param(p).detach().reshape(-1)[:k])
                continue
            mapping = p._hp_mapping
            out.append(None if mapping is None else mapping.get_hp_fragment().detach().reshape(-1))
        return out

    def _moment_parts(self) -> list[tuple | None]:
        """Per trainable parameter: ``(start, numel, exp_avg, exp_avg_sq)``, the elements of its
        flattened tensor that this rank's optimizer partition holds and their moments (views),
        or None where it holds none (ZeRO-1/2)."""
        import deepspeed.comm as dist

        opt, basic = self.engine.optimizer, self.engine.basic_optimizer
        _link_moments(opt, basic)
        out = []
        for p in self.params():
            if self.stage == 3:
                from deepspeed.utils import safe_get_local_optimizer_state

                n = p.ds_tensor.ds_numel  # rank r holds flat[r*n:(r+1)*n], the tail padded
                lo = dist.get_rank(group=p.ds_process_group) * n
                k = max(0, min(n, p.ds_numel - lo))
                m, v = (safe_get_local_optimizer_state(p, key) for key in ("exp_avg", "exp_avg_sq"))
                out.append((lo, k, m.reshape(-1)[:k], v.reshape(-1)[:k]))
                continue
            mapping = p._hp_mapping
            if mapping is None:
                out.append(None)
                continue
            addr = mapping.lp_fragment_address
            m, v = (mapping.get_optim_state_fragment(key) for key in ("exp_avg", "exp_avg_sq"))
            out.append((addr.start, addr.numel, m.reshape(-1), v.reshape(-1)))
        return out

    def _gather_parts(self, local: dict, dtype, device, into=None) -> list[torch.Tensor]:
        """Full tensors of ``params()``' shapes from each rank's parts (``local``: param index
        -> its flat part, laid out as :meth:`_moment_parts` says). ZeRO-3: written into
        ``into`` (full tensors of those shapes) when given, else new tensors."""
        import deepspeed.comm as dist

        params = self.params()
        if self.stage == 3:
            return self._gather_zero3(params, local, dtype, device, into)
        # ZeRO-1/2: each group's partition layout, then the group's flat buffer
        opt = self.engine.optimizer
        index = {id(p): i for i, p in enumerate(params)}
        out: list[torch.Tensor | None] = [None] * len(params)
        for gi, lp_group in enumerate(opt.bit16_groups):
            part = opt.single_partition_of_fp32_groups[gi]
            buf = torch.zeros(part.numel(), dtype=dtype, device=device)
            for p in lp_group:
                i = index.get(id(p))
                if i is None or i not in local:
                    continue
                addr = p._hp_mapping.get_hp_fragment_address()
                buf.narrow(0, addr.start, addr.numel).copy_(local[i])
            group = opt.real_dp_process_group[gi]
            world, ps = dist.get_world_size(group=group), buf.numel()
            full = buf.new_empty(world * ps)
            rows = full.view(world, ps)  # rank r's partition is row r
            step = max(1, -(-ps // self.GATHER_BUCKETS))
            for a in range(0, ps, step):  # in slices: the transient buffer is one slice
                b = min(ps, a + step)
                part_rows = buf.new_empty(world * (b - a))
                # note: GATHER_BUCKETS collectives per group
                dist.all_gather_into_tensor(part_rows, buf[a:b], group=group)
                rows[:, a:b].copy_(part_rows.view(world, b - a))
                del part_rows
            del buf
            base = opt.bit16_groups_flat[gi]
            for p in lp_group:
                i = index.get(id(p))
                if i is None:
                    continue
                offset = (p.data_ptr() - base.data_ptr()) // p.element_size()
                out[i] = full.narrow(0, offset, p.numel()).view_as(p)
        return out

    # all-gathers and all-reduces of model-sized lists run in ~this many pieces: the transient
    # buffer is ~1/8 of the model, not a copy of it
    GATHER_BUCKETS = 8

    def _gather_zero3(self, params, local: dict, dtype, device, into=None) -> list[torch.Tensor]:
        """ZeRO-3: every rank holds ``n_i`` elements of parameter i (rank r: ``flat[r n_i:(r+1)
        n_i]``, the tail padded). The parameters in ~:attr:`GATHER_BUCKETS` buckets, one
        all-gather each, written into ``into`` (or new tensors) tensor by tensor: the transient
        buffers are one bucket, not a second copy of the model."""
        import deepspeed.comm as dist

        group = params[0].ds_process_group
        if any(p.ds_process_group is not group for p in params):
            raise ConfigError(
                f"the {self.role}'s ZeRO-3 parameters are partitioned over more than one "
                "process group (MiCS / hpZ): LGTM's influence passes support one "
                "data-parallel group"
            )
        world = dist.get_world_size(group=group)
        sizes = [p.ds_tensor.ds_numel for p in params]
        out: list[torch.Tensor] = []
        for lo, hi in _buckets(sizes, self.GATHER_BUCKETS):
            total = sum(sizes[lo:hi])
            buf = torch.zeros(total, dtype=dtype, device=device)
            offsets = [0]
            for i in range(lo, hi):
                if i in local:
                    buf.narrow(0, offsets[-1], local[i].numel()).copy_(local[i])
                offsets.append(offsets[-1] + sizes[i])
            gathered = buf.new_empty(world * total)
            dist.all_gather_into_tensor(gathered, buf, group=group)  # note: one per bucket
            del buf
            rows = gathered.view(world, total)
            for k, i in enumerate(range(lo, hi)):
                p = params[i]
                full = rows[:, offsets[k] : offsets[k + 1]].reshape(-1)[: p.ds_numel]
                full = full.view(p.ds_shape)  # (reshape copied: one tensor's worth)
                out.append(into[i].copy_(full) if into is not None else full)
            del gathered, rows
        return out

    def _zero12_gather(self, key: str | None) -> list[torch.Tensor]:
        """Full fp32 masters (``key`` None) or Adam moments of ``params()`` under ZeRO-1/2: one
        all-gather of each group's flat fp32 partitions (rank r holds elements [r*ps, (r+1)*ps)
        of the group's flat buffer, in which every param is a view at a fixed offset)."""
        import deepspeed.comm as dist

        opt, basic = self.engine.optimizer, self.engine.basic_optimizer
        where = {}
        for i, lp_group in enumerate(opt.bit16_groups):
            part = opt.single_partition_of_fp32_groups[i]
            src = (part if key is None else basic.state[part][key]).detach().contiguous()
            group = opt.real_dp_process_group[i]
            pieces = [torch.empty_like(src) for _ in range(dist.get_world_size(group=group))]
            dist.all_gather(pieces, src, group=group)  # note: one collective per group
            full = torch.cat(pieces)
            base = opt.bit16_groups_flat[i]
            for p in lp_group:
                offset = (p.data_ptr() - base.data_ptr()) // p.element_size()
                where[id(p)] = full.narrow(0, offset, p.numel()).view_as(p)
        return [where[id(p)] for p in self.params()]

    # -- ZeRO-3: the influence passes on this rank's partitions (Sharded) ------------------------
    def _sharded_masters(self) -> Sharded:
        """This rank's fp32 master partition of every trainable parameter (views, no copy)."""
        from deepspeed.utils import safe_get_local_fp32_param

        out = Sharded()
        for p in self.params():
            local = safe_get_local_fp32_param(p).detach().reshape(-1)
            n = p.ds_tensor.ds_numel
            if local.numel() != n:  # not a layout DeepSpeed 0.19 has: pad a copy
                local = torch.cat([local[:n], local.new_zeros(max(0, n - local.numel()))])
            out.append(local)
        return out

    def _sharded_lookahead(self, theta, g, step_fn, reuse_g, meta) -> Sharded:
        """Step B on this rank's partitions (masters, moments, ``g``'s slices), no gather: each
        result zero-padded to the partition size."""
        params = self.params()
        parts = self._moment_parts() if meta.step else None
        los = []
        for p in params:
            n = p.ds_tensor.ds_numel
            lo = _shard_rank(p) * n
            los.append((lo, max(0, min(n, p.ds_numel - lo))))
        if theta is None:
            source = self._master_parts()
        else:
            source = [t.reshape(-1).narrow(0, lo, k) for t, (lo, k) in zip(theta, los)]
        if isinstance(g, Sharded):  # step A on partitions
            g_parts = [t.narrow(0, 0, k) for t, (_, k) in zip(g, los)]
        else:
            g_parts = [t.reshape(-1).narrow(0, lo, k) for t, (lo, k) in zip(g, los)]
        state = dataclasses.replace(
            meta,
            exp_avg=[x[2] for x in parts] if parts else None,
            exp_avg_sq=[x[3] for x in parts] if parts else None,
        )
        local = step_fn(source, g_parts, state, out=g_parts if reuse_g else None)
        if reuse_g and isinstance(g, Sharded):
            return g  # the result is in g's parts, its zero tail untouched
        out = Sharded()
        for p, x in zip(params, local):
            buf = x.new_zeros(p.ds_tensor.ds_numel)
            buf.narrow(0, 0, x.numel()).copy_(x)
            out.append(buf)
        return out

    def _gather_flat(self, p, part: torch.Tensor) -> torch.Tensor:
        """The ``world * n`` elements of every rank's part of ``p`` (one all-gather)."""
        import deepspeed.comm as dist

        group = p.ds_process_group
        full = part.new_empty(dist.get_world_size(group=group) * part.numel())
        dist.all_gather_into_tensor(full, part.contiguous(), group=group)  # note: collective
        return full

    def _gather_one(self, p, part: torch.Tensor) -> torch.Tensor:
        """The full tensor of ``p``'s shape from every rank's part."""
        return self._gather_flat(p, part).narrow(0, 0, p.ds_numel).view(p.ds_shape)

    def _scatter_mean(self, p, grad: torch.Tensor) -> torch.Tensor:
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

    # ZeRO-3 influence passes on partitions: None = not tried yet, then whether they work for
    # this model (see accept_partitions)
    _partitioned: bool | None = None

    @property
    def _shards(self) -> bool:
        return self.stage == 3 and self._partitioned is not False

    @contextlib.contextmanager
    def partitioned_backward(self):
        if not self._shards:
            yield None
            return
        with self._zero3_hooks_off():
            pb = _PartitionedBackward(self)
            with self._per_module(pb.form) as formed, _regathered(pb.live):
                pb.formed = formed
                yield pb

    def accept_partitions(self, pb, error: Exception | None = None) -> bool:
        if error is None and len(pb.formed) == len(pb.params):
            self._partitioned = True
            return True
        if error is not None and self._partitioned is not None:
            raise error  # it worked before (or was given up already): a real error
        self._partitioned = False
        _log.warning(
            "%s: the ZeRO-3 influence passes cannot run on partitions for this model (%s); "
            "they run on full fp32 tensors from now on (O(student) memory per rank)",
            self.role,
            f"{type(error).__name__}: {error}"
            if error is not None
            else "a parameter is read outside its module's forward, or never read",
        )
        return False

    def _sharded_perturbed(self, theta: Sharded, v: Sharded, alpha: float, batch: dict):
        """Step D on partitions: each module's ``theta + alpha v`` formed from this rank's
        parts and all-gathered just before its forward (one module's parameters at a time)."""
        params = self.params()

        def form(i):
            local = torch.empty_like(v[i])
            _axpy([local], [theta[i]], [v[i]], alpha)
            return self._gather_one(params[i], local)

        return self._forward_formed(form, batch)

    def _sharded_grad_at(self, parts: Sharded, batches, loss_fn):
        """Step C on partitions: the gradient at the parameters whose parts are ``parts``,
        rank-averaged, as a :class:`Sharded` list. Each module's parameters are all-gathered
        before its forward through :class:`_GatherPart` (whose backward reduce-scatters the
        gradient to this rank's part); what the autograd graph saves of them is a recipe, not
        the tensor (:func:`_regathered`), gathered again in the backward. Peak: the parts, one
        module's parameters and the activations, not a full copy of the model."""
        params = self.params()
        leaves = [x.detach().requires_grad_() for x in parts]
        live: dict = {}  # storage address -> (weakref to the gathered tensor, re-gather)

        def form(i):
            p, part = params[i], leaves[i].detach()
            work = _GatherPart.apply(leaves[i], self, p)
            live[work.untyped_storage().data_ptr()] = (
                weakref.ref(work),
                lambda: self._gather_flat(p, part),
            )
            return work

        grads, total = None, 0.0
        for b in batches:
            with self._per_module(form), _regathered(live), self.head_ctx():
                loss = loss_fn(get_logits(self.module(**model_inputs(b))), b)
                gs = torch.autograd.grad(loss / len(batches), leaves, allow_unused=True)
            live.clear()
            grads = accumulate_grads(grads, gs, leaves)
            del gs
            total += loss.detach()
        if grads is None:
            grads = [torch.zeros_like(x) for x in leaves]
        return Sharded(grads), total / max(len(batches), 1)

    # -- teacher: influence gradient added in fp32 (bf16 engines) -------------------------------
    @property
    def split_influence_backward(self) -> bool:
        return self.module_dtype == torch.bfloat16

    def add_grads_(self, grads: list[torch.Tensor]) -> None:
        """Add rank-local fp32 ``grads`` (already divided by the accumulation steps) to the
        engine's reduced gradients, which must be fp32 (``data_types.grad_accum_dtype``)."""
        if self.stage < 2 or self.engine.get_data_types()[1] != torch.float32:
            raise ConfigError(
                f"LGTM with a bf16 {self.role} needs ZeRO stage 2 or 3 and "
                f'"data_types": {{"grad_accum_dtype": "fp32"}} for it (got stage {self.stage}, '
                f"{self.engine.get_data_types()[1]}): bf16 gradients round the influence term away"
            )
        self.all_reduce_mean_(grads)  # one collective for the whole list; the rest is local
        import deepspeed.comm as dist

        for p, g in zip(self.params(), grads):
            flat = g.reshape(-1)
            if self.stage == 3:
                from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

                n = p.ds_tensor.ds_numel  # this rank's partition: flat[r*n:(r+1)*n], tail padded
                lo = dist.get_rank(group=p.ds_process_group) * n
                hi = min(lo + n, flat.numel())
                local = safe_get_local_grad(p)
                if hi > lo:
                    local[: hi - lo] += flat[lo:hi].to(local.dtype)
                safe_set_local_grad(p, local)
                continue
            mapping = p._hp_mapping  # ZeRO-1/2: this rank's fragment of p's fp32 gradient
            if mapping is None:
                continue  # no part of p lives on this rank
            frag = mapping.get_lp_grad_fragment(p._index_in_param_group)
            addr = mapping.lp_fragment_address
            if frag.numel() != addr.numel:
                raise RuntimeError(f"unexpected gradient fragment layout for a {self.role} param")
            frag.view(-1).add_(flat.narrow(0, addr.start, addr.numel).to(frag.dtype))

    # -- ZeRO-3: run the student at other parameter values, module hooks off ---------------------
    def forward_at(self, params: list[torch.Tensor], batch: dict) -> torch.Tensor:
        if self.stage < 3:
            return super().forward_at(params, batch)
        with self._zero3_hooks_off():
            return super().forward_at(params, batch)

    def forward_perturbed(self, theta, v, alpha, batch):
        if self.stage < 3:
            return super().forward_perturbed(theta, v, alpha, batch)
        with self._zero3_hooks_off():
            if isinstance(v, Sharded):
                return self._sharded_perturbed(theta, v, alpha, batch)
            return super().forward_perturbed(theta, v, alpha, batch)

    def grad_at(self, params, batches, loss_fn):
        if self.stage < 3:
            return super().grad_at(params, batches, loss_fn)
        with self._zero3_hooks_off():
            if isinstance(params, Sharded):
                return self._sharded_grad_at(params, batches, loss_fn)
            return super().grad_at(params, batches, loss_fn)

    def jvp_at(self, params, tangents, batch):
        if self.stage < 3:
            return super().jvp_at(params, tangents, batch)
        with self._zero3_hooks_off():
            return super().jvp_at(params, tangents, batch)

    @contextlib.contextmanager
    def _zero3_hooks_off(self):
        """Run the module functionally on full tensors (``params``, e.g. fp32 ``theta +- R v``)
        with DeepSpeed's ZeRO-3 gather/release hooks removed, and put the hooks back after.

        The influence passes never read or write the shards: a bf16 student's forwards see the
        fp32 perturbation (a bf16 shard would round ``R v`` away), and the student's parameters
        are untouched by construction. Trainable parameters come from ``params``; frozen ones,
        if any, are gathered for the block. Memory: ``params`` are full tensors (as at ZeRO-0-2);
        the partitioned version is the memory issue's work. The same pattern as TRL's
        ``unwrap_model_for_generation`` (remove the hooks, re-register them).
        """
        import deepspeed
        from deepspeed.runtime.zero import parameter_offload as po

        offload = self.engine.optimizer.parameter_offload
        offload.empty_partition_cache()  # release everything gathered, persistent params too
        frozen = [p for p in self.module.parameters() if not p.requires_grad]
        stack_len = len(po.FWD_MODULE_STACK)
        offload._remove_module_hooks()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            gather = deepspeed.zero.GatheredParameters
            with gather(frozen, modifier_rank=None, enabled=bool(frozen)):
                yield
        finally:
            offload.setup_zero_stage3_hooks()
            del po.FWD_MODULE_STACK[stack_len:]  # setup pushes the top module again
            offload.get_param_coordinator().reset_step()

    def sq_norm(self, tensors: list[torch.Tensor]) -> float:
        local = super().sq_norm(tensors)
        if not isinstance(tensors, Sharded):
            return local
        import deepspeed.comm as dist

        group = self.params()[0].ds_process_group
        total = torch.tensor([local], dtype=torch.float64, device=tensors[0].device)
        dist.all_reduce(total, group=group)  # note: collective
        return float(total)

    def all_reduce_mean_(self, tensors: list[torch.Tensor]) -> None:
        import deepspeed.comm as dist

        if isinstance(tensors, Sharded):  # reduced by the reduce-scatter that made it
            return
        if not dist.is_initialized() or dist.get_world_size() == 1 or not tensors:
            return
        world = dist.get_world_size()
        # ~GATHER_BUCKETS collectives, each over one flat bucket: the transient buffer is a
        # bucket, not a second copy of the list (a full-size student gradient, for instance)
        for lo, hi in _buckets([t.numel() for t in tensors], self.GATHER_BUCKETS):
            bucket = tensors[lo:hi]
            flat = torch.cat([t.reshape(-1) for t in bucket])
            dist.all_reduce(flat)  # note: one collective per bucket
            flat.div_(world)
            offset = 0
            for t in bucket:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
            del flat

    # -- saving ----------------------------------------------------------------------------------
    def save_pretrained(self, path: str, is_main: bool, drop: str | None = None, **kwargs) -> None:
        """Hugging Face ``save_pretrained`` of the full model (gathered under ZeRO-3), without
        the submodule named ``drop`` (if any)."""

        def state() -> dict:
            return {
                k: v.detach().cpu().clone()
                for k, v in self.module.state_dict().items()
                if drop is None or not k.startswith(drop + ".")
            }

        if self.stage == 3:
            import deepspeed

            params = list(self.module.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                if is_main:
                    self.module.save_pretrained(path, state_dict=state(), **kwargs)
        elif is_main:
            if drop is not None and hasattr(self.module, drop):
                kwargs["state_dict"] = state()
            self.module.save_pretrained(path, **kwargs)

    def save_checkpoint(self, path: str, tag: str) -> None:
        # save_latest=False: LGTM-DS writes its own `latest` once both roles are complete
        self.engine.save_checkpoint(path, tag=tag, save_latest=False)

    def load_checkpoint(self, path: str, tag: str) -> None:
        load_path, _ = self.engine.load_checkpoint(path, tag=tag)
        if load_path is None:
            raise ConfigError(f"no {self.role} checkpoint {tag!r} under {path}")


class _GatherPart(torch.autograd.Function):
    """``part`` (this rank's flat part of ZeRO-3 parameter ``p``) -> the full tensor
    (all-gather); backward: the gradient's part of the rank-average (reduce-scatter)."""

    @staticmethod
    def forward(ctx, part, adapter, p):
        ctx.adapter, ctx.p = adapter, p
        return adapter._gather_one(p, part)

    @staticmethod
    def backward(ctx, grad):
        return ctx.adapter._scatter_mean(ctx.p, grad), None, None


class _GatherInto(torch.autograd.Function):
    """Like :class:`_GatherPart` from a shard in the module's dtype (``ds_tensor``: the values
    ZeRO-3 itself gathers); backward: the gradient's part of the rank-average, in fp32, added
    to ``acc`` (returns none: the shard gets no ``.grad``)."""

    @staticmethod
    def forward(ctx, part, adapter, p, acc):
        ctx.adapter, ctx.p, ctx.acc = adapter, p, acc
        return adapter._gather_one(p, part)

    @staticmethod
    def backward(ctx, grad):
        ctx.acc.add_(ctx.adapter._scatter_mean(ctx.p, grad.float()))
        return None, None, None, None


class _PartitionedBackward:
    """``Engine.partitioned_backward`` at ZeRO-3: each module's forward reads its parameters
    gathered from the shards (:class:`_GatherInto`); ``backward(loss)`` adds the gradient to
    ``grads`` (fp32, this rank's parts, rank-averaged). Memory: ``grads`` (1/world of an fp32
    student) and one module's parameters and gradients at a time."""

    def __init__(self, adapter):
        self.adapter = adapter
        self.params = adapter.params()
        # the shards as leaves (aliases, no copy), so that the gathers have a backward
        self.leaves = [p.ds_tensor.detach().requires_grad_() for p in self.params]
        self.grads = Sharded(
            torch.zeros(p.ds_tensor.ds_numel, dtype=torch.float32, device=p.ds_tensor.device)
            for p in self.params
        )
        self.live: dict = {}

    def form(self, i):
        p, leaf = self.params[i], self.leaves[i]
        work = _GatherInto.apply(leaf, self.adapter, p, self.grads[i])
        part = leaf.detach()
        self.live[work.untyped_storage().data_ptr()] = (
            weakref.ref(work),
            lambda: self.adapter._gather_flat(p, part),
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


def _shard_rank(p) -> int:
    import deepspeed.comm as dist

    return dist.get_rank(group=p.ds_process_group)


def _link_moments(opt, basic) -> None:
    """Point each param's fp32 fragment mapping at the optimizer's current moments.

    DeepSpeed links them lazily and only once (it may do so before the first step, when the
    state is still empty); relinking is cheap (views only) and makes the accessors reliable.
    """
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    if hasattr(opt, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        lp, hp = opt.bit16_groups, opt.single_partition_of_fp32_groups
    elif hasattr(opt, "bf16_groups"):  # bf16 optimizer
        lp, hp = opt.bf16_groups, opt.fp32_groups_flat_partition
    else:  # ZeRO-3 reads its fp32 partitions directly
        return
    for lp_group, hp_flat in zip(lp, hp):
        if hp_flat in basic.state:
            lazy_init_hp_params_optimizer_state(lp_group, hp_flat, basic.state)


def _fp16_optimizer_views(opt, params):
    """For DeepSpeed's FP16_Optimizer / FP16_UnfusedOptimizer (ZeRO-0 with bf16/fp16): per param,
    (fp32 master view, the tensor keyed in the optimizer state, start, end). None otherwise."""
    if not hasattr(opt, "fp16_groups"):
        return None
    out = {}
    if hasattr(opt, "fp32_groups_flat"):  # fused: one unpadded flat master per group
        for group, flat in zip(opt.fp16_groups, opt.fp32_groups_flat):
            offset = 0
            for p in group:
                end = offset + p.numel()
                out[id(p)] = (flat.detach()[offset:end], flat, offset, end)
                offset = end
    elif hasattr(opt, "fp32_groups"):  # unfused: one fp32 master per param
        for group, masters in zip(opt.fp16_groups, opt.fp32_groups):
            for p, master in zip(group, masters):
                out[id(p)] = (master.detach().view(-1), master, 0, p.numel())
    else:
        return None
    missing = [i for i, p in enumerate(params) if id(p) not in out]
    if missing:
        raise RuntimeError(f"{len(missing)} student params are not in the fp16 optimizer groups")
    return out


def _buckets(sizes: list[int], n: int):
    """``(lo, hi)`` index ranges of consecutive items, each at most ~1/n of the total size (or
    one item, when an item alone is larger)."""
    cap = max(max(sizes, default=0), -(-sum(sizes) // n))
    lo = 0
    while lo < len(sizes):
        hi, total = lo, 0
        while hi < len(sizes) and (hi == lo or total + sizes[hi] <= cap):
            total += sizes[hi]
            hi += 1
        yield lo, hi
        lo = hi
