"""What a DeepSpeed engine holds per ZeRO stage, read and written in place: the fp32 masters,
the Adam moments, the reduced gradients' partitions, and the simulated AdamW look-ahead on this
rank's partitions (LGTM's step B). One of the modules that import DeepSpeed.

Layouts (DeepSpeed 0.19; every private attribute read here is listed in ``ds_private.py``):

- ZeRO-0 fp32: the client optimizer sees the module's parameters (torch state).
- ZeRO-0 bf16/fp16: DeepSpeed's FP16_Optimizer: full flat fp32 masters on every rank.
- ZeRO-1/2: each rank holds a contiguous slice of every parameter group's flat fp32 buffer;
  each parameter maps its fragment through ``_hp_mapping``.
- ZeRO-3: rank ``r`` holds ``flat[r n:(r + 1) n]`` of every parameter (``n = ds_tensor.
  ds_numel``, the tail padded).

Student-sized gathers run in ~``GATHER_BUCKETS`` pieces, so the transient buffer is ~1/8 of
the model, not a copy of it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from ..errors import ConfigError
from .base import AdamState, Sharded, adam_hparams, adam_state_from_torch


class ZeroState:
    """The optimizer state of one DeepSpeed ``engine`` (its ``role``; ``params``: its trainable
    parameters as the forward reads them)."""

    # all-gathers and all-reduces of model-sized lists run in ~this many pieces
    GATHER_BUCKETS = 8

    def __init__(self, engine, role: str, params: Callable[[], list[torch.Tensor]]):
        self.engine, self.role, self.params = engine, role, params
        self.stage = int(engine.zero_optimization_stage())

    def master_params(self, sharded: bool = False) -> list[torch.Tensor]:
        if sharded:
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
        :class:`Sharded` list (the caller asks only where the passes run on partitions)."""
        if self.engine.optimizer is self.engine.basic_optimizer or self.stage == 0:
            theta = self.master_params() if theta is None else theta
            return step_fn(theta, g, self.adam_state(), out=g if reuse_g else None)
        meta = self._adam_meta()
        if sharded:
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
        for lo, hi in buckets(sizes, self.GATHER_BUCKETS):
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
            lo = shard_rank(p) * n
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

    def add_grads_(self, grads: list[torch.Tensor]) -> None:
        """Add rank-averaged fp32 ``grads`` (already divided by the accumulation steps) to this
        rank's partitions of the engine's reduced gradients, which must be fp32
        (``data_types.grad_accum_dtype``)."""
        if self.stage < 2 or self.engine.get_data_types()[1] != torch.float32:
            raise ConfigError(
                f"LGTM with a bf16 {self.role} needs ZeRO stage 2 or 3 and "
                f'"data_types": {{"grad_accum_dtype": "fp32"}} for it (got stage {self.stage}, '
                f"{self.engine.get_data_types()[1]}): bf16 gradients round the influence term away"
            )
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


def shard_rank(p) -> int:
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


def buckets(sizes: list[int], n: int):
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
