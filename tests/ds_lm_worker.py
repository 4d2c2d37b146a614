"""Token-level distillation on real DeepSpeed engines: 3 steps per engine configuration on
decoder batches of unequal lengths (prompt and padding masked), saving the final fp32
parameters (rank 0) for ``tests/integration/test_ds_lm_equivalence.py``.

    deepspeed --num_gpus N tests/ds_lm_worker.py --out DIR
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
from tests.ds_worker import ds_config, full_params, local_storage  # noqa: E402
from tests.helpers import lm_batch, tiny_decoder  # noqa: E402

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


def batches(step, rank, world, gas):
    out = []
    for seed, n in ((1000 + step, GLOBAL_BATCH), (2000 + step, GLOBAL_BATCH)):
        b = lm_batch(n, seed)
        mine = {k: v[rank::world] for k, v in b.items()}
        m = n // world // gas
        out.append([{k: v[i * m : (i + 1) * m] for k, v in mine.items()} for i in range(gas)])
    return out


def _models(pair):
    t, s = PAIRS[pair]
    return tiny_decoder(t, 1), tiny_decoder(s, 2)


def _released(adapter) -> bool:
    """Under ZeRO-3: every parameter is back to its shard (nothing left gathered)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    ps = [p for p in adapter.module.parameters() if hasattr(p, "ds_status") and not p.ds_persist]
    # and no parameter was read outside its module (ZeRO-3 then registers it with another one)
    external = [p for m in adapter.module.modules() for _, p in m.ds_external_parameters()]
    return not external and all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in ps)


def run_case(name, rank, world):
    method, ts, ss, precision, gas, fused, pair = CASES[name]
    teacher, student = _models(pair)
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
            released &= stage < 3 or _released(engines[role])
    return {
        "teacher": full_params(engines["teacher"]),
        "student": full_params(engines["student"]),
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
    opts = {}
    for role, model, lr in (("teacher", teacher, 3e-3), ("student", student, 5e-3)):
        opt = build_adamw(model, lr, 0.01)
        opts[role] = (opt, warmup_linear(opt, 10, 0.2))
    d = Distiller(
        method,
        teacher=teacher,
        student=student,
        teacher_optimizer=opts["teacher"][0],
        student_optimizer=opts["student"][0],
        teacher_scheduler=opts["teacher"][1],
        student_scheduler=opts["student"][1],
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
    args = ap.parse_args()
    rank, world = init_distributed(timeout_s=300)
    for name in CASES:
        try:
            res = run_case(name, rank, world)
        except Exception:
            traceback.print_exc()
            res = {"error": "crash: " + traceback.format_exc(limit=3)}
        if rank == 0:
            torch.save(res, os.path.join(args.out, f"{name}.w{world}.pt"))
    if rank == 0:
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
