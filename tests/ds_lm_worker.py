"""Token-level distillation on real DeepSpeed engines: 3 steps per engine configuration on
decoder batches of unequal lengths (prompt and padding masked), saving the final fp32
parameters (rank 0) for ``tests/integration/test_ds_lm_equivalence.py``; with ``--lora`` the
cases with LoRA adapters (``LORA_CASES``) for ``tests/integration/test_ds_adapters.py``.

    deepspeed --num_gpus N tests/ds_lm_worker.py --out DIR [--lora]
"""

import argparse
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lgtm_ds import Distiller  # noqa: E402
from lgtm_ds.engines.deepspeed import build_engine  # noqa: E402
from lgtm_ds.engines.dist import init_distributed, shutdown_distributed  # noqa: E402
from lgtm_ds.engines.optim import build_adamw, warmup_linear  # noqa: E402
from lgtm_ds.tasks import get_task  # noqa: E402
from tests.ds_worker import PLAIN, ds_config, full_params, local_storage  # noqa: E402
from tests.helpers import lm_batch, make_distiller, tiny_decoder  # noqa: E402

GLOBAL_BATCH, STEPS = 8, 3
# name: (method, teacher stage, student stage, precision, gradient accumulation steps,
#        fused head, model pair)
CASES = {
    "lm_z2_2": ("lgtm", 2, 2, "fp32", 1, False, "gpt2"),
    "lm_z2_2_gas2": ("lgtm", 2, 2, "fp32", 2, False, "gpt2"),
    "lm_z3_3": ("lgtm", 3, 3, "fp32", 1, False, "gpt2"),
    "lm_z3_2": ("lgtm", 3, 2, "fp32", 1, False, "gpt2"),
    "lm_online_z2_2_gas2": ("online_kd", 2, 2, "fp32", 2, False, "gpt2"),
    "lm_z3_3_bf16": ("lgtm", 3, 3, "bf16", 1, False, "gpt2"),
    # the fused head (no full logits) on ZeRO-3: the output layer is gathered by its own hooks
    "lm_z3_3_fused_gas2": ("lgtm", 3, 3, "fp32", 2, True, "gpt2"),  # tied output layer
    "lm_z3_2_fused_llama": ("lgtm", 3, 2, "fp32", 1, True, "llama"),  # untied
    "lm_online_z3_3_fused_llama": ("online_kd", 3, 3, "fp32", 1, True, "llama"),
    "lm_z3_3_bf16_fused": ("lgtm", 3, 3, "bf16", 1, True, "gpt2"),
    "lm_z3_3_bf16_fused_llama": ("lgtm", 3, 3, "bf16", 1, True, "llama"),
    # MetaDistil with the fused head: the student's JVP and the meta-gradient through the heads
    "lm_meta_z3_3_fused_gas2": ("metadistil", 3, 3, "fp32", 2, True, "gpt2"),
    "lm_meta_z3_2_fused_llama": ("metadistil", 3, 2, "fp32", 1, True, "llama"),
}
PAIRS = {"gpt2": ("gpt2-teacher", "gpt2-student"), "llama": ("student", "tiny")}
# LoRA adapters (lgtm_ds.tasks.adapters) on the pair "<pair>_lora" (both sides) or
# "<pair>_lora_teacher"; an eighth field: activation checkpointing on both models
LORA_CASES = {
    "lm_lora_z0_0": ("lgtm", 0, 0, "fp32", 1, False, "gpt2_lora"),
    "lm_lora_z1_1": ("lgtm", 1, 1, "fp32", 1, False, "gpt2_lora"),
    "lm_lora_z2_2_gas2": ("lgtm", 2, 2, "fp32", 2, False, "gpt2_lora"),
    "lm_lora_z3_3": ("lgtm", 3, 3, "fp32", 1, False, "gpt2_lora"),
    "lm_lora_teacher_z3_2": ("lgtm", 3, 2, "fp32", 1, False, "gpt2_lora_teacher"),
    "lm_lora_z2_2_ckpt": ("lgtm", 2, 2, "fp32", 1, False, "gpt2_lora", True),
    "lm_lora_z3_3_fused_llama": ("lgtm", 3, 3, "fp32", 1, True, "llama_lora"),
    "lm_lora_meta_z2_2": ("metadistil", 2, 2, "fp32", 1, False, "gpt2_lora"),
    "lm_lora_z2_2_bf16": ("lgtm", 2, 2, "bf16", 1, False, "gpt2_lora"),
    "lm_lora_z3_3_bf16": ("lgtm", 3, 3, "bf16", 1, False, "gpt2_lora"),
}


def batches(step, rank, world, gas):
    out = []
    for seed, n in ((1000 + step, GLOBAL_BATCH), (2000 + step, GLOBAL_BATCH)):
        b = lm_batch(n, seed)
        mine = {k: v[rank::world] for k, v in b.items()}
        m = n // world // gas
        out.append([{k: v[i * m : (i + 1) * m] for k, v in mine.items()} for i in range(gas)])
    return out


def _models(pair):
    base, _, sides = pair.partition("_lora")
    t, s = PAIRS[base]
    teacher, student = tiny_decoder(t, 1), tiny_decoder(s, 2)
    if _:
        from lgtm_ds.tasks.adapters import AdapterOptions, apply_adapters

        roles = ("teacher",) if sides == "_teacher" else ("teacher", "student")
        for role, model, seed in (("teacher", teacher, 11), ("student", student, 12)):
            if role in roles:
                opts = AdapterOptions(enabled=True, r=4, alpha=6.0)
                apply_adapters(model, opts, key=f"model.{role}_peft", name=role, seed=seed)
                g = torch.Generator().manual_seed(seed)
                with torch.no_grad():  # B != 0: every adapter gradient non-zero from step 1
                    for n, p in model.named_parameters():
                        if "lora_B" in n:
                            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return teacher, student


def _params(adapter):
    """Every parameter of the engine's module as a full fp32 tensor: the trainable ones from
    the optimizer's masters, the frozen ones (no optimizer state) gathered under ZeRO-3."""
    trainable = [p for p in adapter.module.parameters() if p.requires_grad]
    masters = dict(zip(map(id, trainable), full_params_of(trainable)))
    out = []
    for p in adapter.module.parameters():
        if id(p) in masters:
            out.append(masters[id(p)])
        elif hasattr(p, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                out.append(p.detach().float().cpu().clone())
        else:
            out.append(p.detach().float().cpu().clone())
    return out


def full_params_of(params):
    from deepspeed.utils import safe_get_full_fp32_param

    out = []
    for p in params:
        full = safe_get_full_fp32_param(p)  # collective under ZeRO-1/2/3 and bf16
        out.append((full if full is not None else p.detach()).float().cpu().clone())
    return out


def _optimizer_numel(adapter) -> int:
    """Elements this rank's AdamW keeps moments of (its fp32 master partitions, or the client
    AdamW's parameters at ZeRO-0 fp32)."""
    state = adapter.engine.basic_optimizer.state.values()
    return sum(st["exp_avg"].numel() for st in state if "exp_avg" in st)


def _released(adapter, allow_external: bool = False) -> bool:
    """Under ZeRO-3: every parameter is back to its shard (nothing left gathered)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    ps = [p for p in adapter.module.parameters() if hasattr(p, "ds_status") and not p.ds_persist]
    # and no parameter was read outside its module (ZeRO-3 then registers it with another one)
    external = [p for m in adapter.module.modules() for _, p in m.ds_external_parameters()]
    if allow_external:  # peft reads lora_A.weight.dtype in the LoRA layer's own forward
        external = []
    return not external and all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in ps)


def run_case(name, rank, world):
    method, ts, ss, precision, gas, fused, pair, *ckpt = {**CASES, **LORA_CASES}[name]
    teacher, student = _models(pair)
    if ckpt and ckpt[0]:
        for m in (teacher, student):
            m.gradient_checkpointing_enable({"use_reentrant": False})
    init = {
        "teacher": [p.detach().clone() for p in teacher.parameters()],
        "student": [p.detach().clone() for p in student.parameters()],
    }
    micro = GLOBAL_BATCH // world // gas
    engines = {}
    for role, model, stage, lr in (("teacher", teacher, ts, 3e-3), ("student", student, ss, 5e-3)):
        opt = build_adamw(model, lr, 0.01)
        engines[role] = build_engine(
            model,
            opt,
            warmup_linear(opt, 10, 0.2),
            # fused cases: no persistent parameters, so the output layer is truly partitioned
            ds_config(stage, precision, micro, gas, world, 0 if fused else None, role),
            role,
        )
    task = get_task("causal_lm")(head_chunk=5 if fused else None)
    d = Distiller(
        method,
        teacher=engines["teacher"],
        student=engines["student"],
        task=task,
        fused_head=fused,
    )
    restored, released, influence = True, True, []
    for step in range(STEPS):
        train, quiz = batches(step, rank, world, gas)
        if method == "lgtm":
            before = [local_storage(p).clone() for p in student.parameters()]
            m = d.method.teacher_update(train, quiz)
            restored &= all(
                torch.equal(local_storage(p), b) for p, b in zip(student.parameters(), before)
            )
            influence.append(m["influence"])
        else:
            d.method.teacher_update(train, quiz if method == "metadistil" else None)
        d.method.student_update(train)
        for role, stage in (("teacher", ts), ("student", ss)):
            released &= stage < 3 or _released(engines[role], allow_external="_lora" in pair)
    lora = "_lora" in pair
    return {
        "teacher": (_params if lora else full_params)(engines["teacher"]),
        "student": (_params if lora else full_params)(engines["student"]),
        "trainable": {
            r: [p.requires_grad for p in e.module.parameters()] for r, e in engines.items()
        },
        "optimizer_numel": {r: _optimizer_numel(e) for r, e in engines.items()},
        "init": init,
        "restored": restored,
        "released": released,
        "fused": {role: e.fused_head for role, e in engines.items()},
        "influence": torch.cat(influence) if influence else None,
        "influence_steps": influence,  # this rank's sequences (rank::world of the global batch)
    }


def run_torch(method, pair="gpt2", dtype=torch.float32):
    """The plain-module path (full logits), one micro-batch of the whole global batch."""
    teacher, student = (m.to(dtype) for m in _models(pair))
    d = make_distiller(
        method,
        teacher,
        student,
        **PLAIN,
        max_grad_norm=1.0,
        task=get_task("causal_lm")(),
        fused_head=False,
    )
    influence = []
    for step in range(STEPS):
        train, quiz = batches(step, 0, 1, 1)
        influence.append(d.step(train, quiz).get("influence"))
    return {
        "teacher": [p.detach().float().clone() for p in teacher.parameters()],
        "student": [p.detach().float().clone() for p in student.parameters()],
        "influence_steps": influence,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=0)
    ap.add_argument("--lora", action="store_true", help="the LORA_CASES instead of CASES")
    ap.add_argument("--only", default=None, help="comma-separated case names (debugging)")
    args = ap.parse_args()
    rank, world = init_distributed(timeout_s=300)
    names = list(LORA_CASES if args.lora else CASES)
    for name in args.only.split(",") if args.only else names:
        try:
            res = run_case(name, rank, world)
        except Exception:
            traceback.print_exc()
            res = {"error": "crash: " + traceback.format_exc(limit=3)}
        if rank == 0:
            torch.save(res, os.path.join(args.out, f"{name}.w{world}.pt"))
    if rank == 0 and args.lora:
        ref = {
            f"{m}_{pair}": run_torch(m, pair)
            for m, pair in (
                ("lgtm", "gpt2_lora"),
                ("lgtm", "gpt2_lora_teacher"),
                ("lgtm", "llama_lora"),
                ("metadistil", "gpt2_lora"),
            )
        }
        torch.save(ref, os.path.join(args.out, f"torch_lora.w{world}.pt"))
    elif rank == 0:
        ref = {
            "lgtm": run_torch("lgtm"),
            "online_kd": run_torch("online_kd"),
            "lgtm_llama": run_torch("lgtm", "llama"),
            "online_kd_llama": run_torch("online_kd", "llama"),
            "metadistil": run_torch("metadistil"),
            "metadistil_llama": run_torch("metadistil", "llama"),
            # float64 oracle of the per-sequence influence (GPT-2 blocks are float64 throughout)
            "lgtm_fp64": run_torch("lgtm", "gpt2", torch.float64),
        }
        torch.save(ref, os.path.join(args.out, f"torch.w{world}.pt"))
    print(f"rank {rank}: done", flush=True)
    shutdown_distributed()


if __name__ == "__main__":
    main()
