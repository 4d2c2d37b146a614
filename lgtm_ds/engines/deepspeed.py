"""The DeepSpeed engines of the teacher and the student, behind the :class:`Engine` interface:
a thin adapter over DeepSpeed's engine, the process group (``dist``), the optimizer state per
ZeRO stage (``zero_state``) and the student's ZeRO-3 passes (``zero3_functional``). These four
modules are the only ones that import DeepSpeed; the private attributes they read are listed
in ``ds_private``.

``build_engine`` is the one place that calls ``deepspeed.initialize``, once per role, each with
its own config dict (DeepSpeed-Chat's ``rlhf_engine.py`` shape); ``lgtm_ds.engines.build``
assembles both roles. The student's engine also implements :class:`InfluencePasses` (the
look-ahead and the forwards at other parameter values); the teacher's does not.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os

import torch

from ..errors import ConfigError
from ..tasks.adapters import ADAPTER_DIR, merged_state_dict, peft_wrapper, save_adapter
from .base import Engine, InfluencePasses, Sharded, get_logits, model_inputs
from .dist import all_gather_object, barrier, init_distributed  # noqa: F401  (the process group)
from .head import HeadOutput, swap_forward
from .zero3_functional import Zero3Functional, zero3_hooks_off
from .zero_state import ZeroState, buckets


def build_engine(model: torch.nn.Module, optimizer, scheduler, ds_config: dict, role: str):
    """``deepspeed.initialize`` for one role, with a client optimizer and LR scheduler."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return (DeepSpeedStudentEngine if role == "student" else DeepSpeedEngine)(engine, role)


def frozen_ds_config(ds_config: dict) -> dict:
    """The DeepSpeed config of a role that never steps. ZeRO-3 keeps partitioning its parameters
    (DeepSpeed's path for a model without an optimizer: ``DeepSpeedZeRoOffload``, as DeepSpeed-
    Chat builds its reference model). ZeRO-1/2 partition only optimizer state and gradients, which
    a frozen model has none of, and DeepSpeed refuses them without an optimizer: stage 0, the
    parameters in the config's precision on every rank."""
    cfg = copy.deepcopy(ds_config)
    zero = dict(cfg.get("zero_optimization") or {})
    zero.pop("offload_optimizer", None)  # there is no optimizer to offload
    if int(zero.get("stage", 0)) in (1, 2):
        zero["stage"] = 0
    cfg["zero_optimization"] = zero
    for key in ("optimizer", "scheduler"):
        cfg.pop(key, None)
    return cfg


def build_frozen_engine(model: torch.nn.Module, ds_config: dict, role: str):
    """``deepspeed.initialize`` without an optimizer for a role that never learns (a frozen
    teacher): no fp32 masters, optimizer state or gradient buffers; checkpoints hold a marker
    instead of its weights (the run rebuilds them from ``model.<role>``)."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, config=frozen_ds_config(ds_config))
    return DeepSpeedEngine(engine, role, frozen=True)


class DeepSpeedEngine(Engine):
    """One role's DeepSpeed engine: the training API, and the teacher's side of a bf16
    influence term (its gradient added to the engine's fp32 partitions)."""

    FROZEN_MARKER = "frozen.json"  # a frozen role's checkpoint folder: this, not its weights

    def __init__(self, engine, role: str, frozen: bool = False):
        self.engine = engine
        self.role = role
        self.frozen = frozen
        self.module = engine.module
        self.gradient_accumulation_steps = int(engine.gradient_accumulation_steps())
        self.stage = int(engine.zero_optimization_stage())
        self.state = ZeroState(engine, role, self.params)
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
        if self.frozen:
            raise RuntimeError(f"the {self.role}'s engine has no optimizer (a frozen role)")
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

    @property
    def module_dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    # -- teacher: influence gradient added in fp32 (bf16 engines) -------------------------------
    @property
    def split_influence_backward(self) -> bool:
        return self.module_dtype == torch.bfloat16

    def add_grads_(self, grads: list[torch.Tensor]) -> None:
        """Add rank-local fp32 ``grads`` (already divided by the accumulation steps) to the
        engine's reduced gradients, which must be fp32 (``data_types.grad_accum_dtype``)."""
        self.all_reduce_mean_(grads)  # one collective for the whole list; the rest is local
        self.state.add_grads_(grads)

    def all_reduce_mean_(self, tensors: list[torch.Tensor]) -> None:
        import deepspeed.comm as dist

        if isinstance(tensors, Sharded):  # reduced by the reduce-scatter that made it
            return
        if not dist.is_initialized() or dist.get_world_size() == 1 or not tensors:
            return
        world = dist.get_world_size()
        # ~GATHER_BUCKETS collectives, each over one flat bucket: the transient buffer is a
        # bucket, not a second copy of the list (a full-size student gradient, for instance)
        for lo, hi in buckets([t.numel() for t in tensors], ZeroState.GATHER_BUCKETS):
            bucket = tensors[lo:hi]
            flat = torch.cat([t.reshape(-1) for t in bucket])
            dist.all_reduce(flat)  # note: one collective per bucket
            flat.div_(world)
            offset = 0
            for t in bucket:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
            del flat

    @contextlib.contextmanager
    def generation_params(self, gather: bool = True):
        """ZeRO-3 across ranks: with ``gather``, every parameter all-gathered once for the block
        and the module's ZeRO-3 hooks off (forwards are local: no per-token collective, each rank
        stops when its own rows are done; the full model is held on every rank meanwhile), as
        TRL's ``unwrap_model_for_generation``; without, DeepSpeed gathers each module per
        forward, a collective every token. ZeRO 0-2 hold full parameters: nothing to do."""
        import deepspeed.comm as dist

        world = dist.get_world_size() if dist.is_initialized() else 1
        if self.stage < 3:
            yield False
        elif not gather:
            yield world > 1
        else:
            with zero3_hooks_off(self.engine, list(self.module.parameters())):
                yield False

    # -- saving ----------------------------------------------------------------------------------
    def save_pretrained(
        self, path: str, is_main: bool, drop: str | None = None, merge: bool = False, **kwargs
    ) -> None:
        """Hugging Face ``save_pretrained`` of the full model, without the submodule named
        ``drop`` (if any). A model with LoRA adapters: the adapter folder, or with ``merge`` the
        merged plain model and the adapter folder inside it (``tasks/adapters.py``). Collective
        at ZeRO-3: every rank calls it; the parameters are gathered one module at a time
        (:meth:`_gathered_state`), so the whole model is never on one device (rank 0 collects it
        in CPU memory; an adapter folder alone gathers only the trainable weights)."""
        adapters = peft_wrapper(self.module) is not None
        deltas = None
        if self.stage == 3:
            state = self._gathered_state(trainable_only=adapters and not merge, is_main=is_main)
            if adapters and merge:
                self._merge_into(state, is_main)
                deltas = {}  # the adapted weights in ``state`` are merged already
        elif is_main and (adapters or (drop is not None and hasattr(self.module, drop))):
            state = {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
        else:
            state = None
        if not is_main:
            return
        if state is not None and drop is not None:
            state = {k: v for k, v in state.items() if not k.startswith(drop + ".")}
        if adapters and merge:
            merged = merged_state_dict(self.module, state, deltas)
            self.module.save_pretrained(path, state_dict=merged, **kwargs)
            save_adapter(self.module, os.path.join(path, ADAPTER_DIR), state)
        elif adapters:
            save_adapter(self.module, path, state)
        elif state is not None:
            self.module.save_pretrained(path, state_dict=state, **kwargs)
        else:
            self.module.save_pretrained(path, **kwargs)

    def _gathered_state(self, trainable_only: bool, is_main: bool) -> dict | None:
        """ZeRO-3: the module's state dict as full CPU tensors on the main rank (None on the
        others), gathered one module's own parameters at a time and released after, tied
        parameters kept tied (DeepSpeed's ``_zero3_consolidated_16bit_state_dict`` does the
        same through a private method). ``trainable_only``: the parameters that train and
        nothing else (an adapter folder's content). Collective."""
        import deepspeed

        state: dict | None = {} if is_main else None
        seen: dict[int, str] = {}
        for prefix, mod in self.module.named_modules():
            prefix = f"{prefix}." if prefix else ""
            own = [
                (n, p)
                for n, p in mod.named_parameters(recurse=False)
                if p is not None and (p.requires_grad or not trainable_only)
            ]
            with deepspeed.zero.GatheredParameters(
                [p for _, p in own], modifier_rank=None, enabled=bool(own)
            ):
                if not is_main:
                    continue
                for n, p in own:
                    if id(p) in seen:  # tied: the same tensor under a second name
                        state[prefix + n] = state[seen[id(p)]]
                    else:
                        state[prefix + n] = p.detach().cpu().clone()
                        seen[id(p)] = prefix + n
                if trainable_only:
                    continue
                for n, b in mod.named_buffers(recurse=False):
                    if b is not None and n not in mod._non_persistent_buffers_set:
                        state[prefix + n] = b.detach().cpu().clone()
        return state

    def _merge_into(self, state: dict | None, is_main: bool) -> None:
        """ZeRO-3: add each LoRA layer's ``(alpha / r) B A`` to its base weight in ``state``
        (the main rank's CPU copy), gathering one layer at a time; one delta is held at once.
        Collective."""
        import deepspeed
        from peft.tuners.lora import LoraLayer

        for name, mod in self.module.named_modules():
            if not (isinstance(mod, LoraLayer) and "default" in mod.lora_A):
                continue
            with deepspeed.zero.GatheredParameters(list(mod.parameters()), modifier_rank=None):
                if is_main:
                    w = state[f"{name}.base_layer.weight"]
                    w.add_(mod.get_delta_weight("default").detach().cpu().to(w.dtype))

    def save_checkpoint(self, path: str, tag: str) -> None:
        if self.frozen:  # never steps: its weights are model.<role>'s, rebuilt on resume
            folder = os.path.join(path, tag)
            os.makedirs(folder, exist_ok=True)
            if _rank() == 0:
                with open(os.path.join(folder, self.FROZEN_MARKER), "w") as fh:
                    json.dump({"role": self.role, "frozen": True}, fh)
            return
        # save_latest=False: LGTM-DS writes its own `latest` once both roles are complete.
        # Frozen weights (a LoRA base) are left out: they never change, and a resumed run
        # rebuilds them from model.<role> (an 8B bf16 base is 16 GB per checkpoint otherwise).
        # DeepSpeed's exclude_frozen_parameters drops the names named_parameters() gives, one
        # per tensor, so a tied weight's other name (lm_head.weight of a tied embedding: 113 MB
        # on SmolLM2-135M) stayed in; the hook drops every name of a frozen weight.
        frozen = self._frozen_names()

        def drop_frozen(module, state_dict, prefix, local_metadata):
            for name in frozen:
                state_dict.pop(prefix + name, None)

        hook = self.module.register_state_dict_post_hook(drop_frozen) if frozen else None
        try:
            self.engine.save_checkpoint(
                path, tag=tag, save_latest=False, exclude_frozen_parameters=bool(frozen)
            )
        finally:
            if hook is not None:
                hook.remove()

    def _frozen_names(self) -> set[str]:
        """Every name of every frozen weight, a tied weight's aliases included."""
        named = self.module.named_parameters(remove_duplicate=False)
        return {n for n, p in named if not p.requires_grad}

    def load_checkpoint(self, path: str, tag: str) -> None:
        marker = os.path.exists(os.path.join(path, tag, self.FROZEN_MARKER))
        if self.frozen != marker:
            was, now = ("frozen", "trained") if marker else ("trained", "frozen")
            raise ConfigError(
                f"the {self.role} of checkpoint {tag!r} under {path} was {was} and is {now} in "
                f"this run (the method or its {self.role} stage changed): resume with the "
                f"settings that wrote it, or start a fresh run"
            )
        if self.frozen:
            return
        frozen, role = self._frozen_names(), self.role

        def load_trainable(src: dict, dst: torch.nn.Module) -> None:
            # strict but for the frozen weights the checkpoint leaves out (kept as built)
            res = dst.load_state_dict(src, strict=False)
            missing = sorted(set(res.missing_keys) - frozen)
            unexpected = sorted(res.unexpected_keys)
            if missing or unexpected:
                raise ConfigError(
                    f"the {role} checkpoint {tag!r} under {path} does not fit this model: "
                    f"{len(missing)} weights missing {missing[:3]}, {len(unexpected)} unexpected "
                    f"{unexpected[:3]} (the model or its adapters, model.{role}_peft, changed "
                    f"since it was written: resume with the settings that wrote it, or start a "
                    f"fresh run)"
                )

        # always through load_trainable: a checkpoint of another model (adapters added or
        # dropped since) is one error, not DeepSpeed's strict-load traceback
        load_path, _ = self.engine.load_checkpoint(path, tag=tag, custom_load_fn=load_trainable)
        if load_path is None:
            raise ConfigError(f"no {self.role} checkpoint {tag!r} under {path}")


def _rank() -> int:
    import deepspeed.comm as dist

    return dist.get_rank() if dist.is_initialized() else 0


class DeepSpeedStudentEngine(DeepSpeedEngine, InfluencePasses):
    """The student's engine: the influence passes on DeepSpeed's own state: the look-ahead on
    this rank's master and moment partitions (:class:`ZeroState`), and at ZeRO-3 the forwards
    at other parameter values with the engine's hooks off, on partitions
    (:class:`Zero3Functional`)."""

    def __init__(self, engine, role: str):
        super().__init__(engine, role)
        self.zero3 = Zero3Functional(self)

    def master_params(self, sharded: bool = False) -> list[torch.Tensor]:
        return self.state.master_params(sharded=sharded and self.zero3.shards)

    def adam_state(self):
        return self.state.adam_state()

    def lookahead(self, theta, g, step_fn, reuse_g=False, sharded=False):
        sharded = sharded and self.zero3.shards
        return self.state.lookahead(theta, g, step_fn, reuse_g=reuse_g, sharded=sharded)

    def forward_at(self, params: list[torch.Tensor], batch: dict) -> torch.Tensor:
        with self.zero3.hooks_off():
            return super().forward_at(params, batch)

    def forward_perturbed(self, theta, v, alpha, batch):
        with self.zero3.hooks_off():
            if isinstance(v, Sharded):
                return self.zero3.perturbed(theta, v, alpha, batch)
            return super().forward_perturbed(theta, v, alpha, batch)

    def grad_at(self, params, batches, loss_fn):
        with self.zero3.hooks_off():
            if isinstance(params, Sharded):
                return self.zero3.grad_at(params, batches, loss_fn)
            return super().grad_at(params, batches, loss_fn)

    def jvp_at(self, params, tangents, batch):
        with self.zero3.hooks_off():
            return super().jvp_at(params, tangents, batch)

    def partitioned_backward(self):
        return self.zero3.partitioned_backward()

    def accept_partitions(self, pb, error: Exception | None = None) -> bool:
        return self.zero3.accept_partitions(pb, error)

    def sq_norm(self, tensors: list[torch.Tensor]) -> float:
        local = InfluencePasses.sq_norm(self, tensors)
        if not isinstance(tensors, Sharded):
            return local
        import deepspeed.comm as dist

        group = self.params()[0].ds_process_group
        total = torch.tensor([local], dtype=torch.float64, device=tensors[0].device)
        dist.all_reduce(total, group=group)  # note: collective
        return float(total)
