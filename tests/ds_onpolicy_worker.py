"""On-policy steps on real DeepSpeed engines: 3 greedy on-policy steps (``method.lmbda`` 1,
temperature 0; or ``method.seq_kd``) per engine configuration on decoder prompts whose greedy
completions stop at different lengths, saving the final fp32 parameters (rank 0) and each
rank's generated token counts for ``tests/integration/test_ds_onpolicy.py``.

    deepspeed --num_gpus N tests/ds_onpolicy_worker.py --out DIR
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
from lgtm_ds.tasks.rollout import IGNORE, batch_prompts  # noqa: E402
from tests.ds_lm_worker import GLOBAL_BATCH, STEPS, _models, batches  # noqa: E402
from tests.ds_worker import PLAIN, ds_config, full_params  # noqa: E402
from tests.helpers import LM_VOCAB, lm_batch, make_distiller  # noqa: E402

MAX_NEW = 5
# name: (method, teacher stage, student stage, gradient accumulation steps, seq_kd,
#        method.generation.zero3_gather)
CASES = {
    "op_z0_0": ("lgtm", 0, 0, 1, False, True),
    "op_z1_1": ("lgtm", 1, 1, 1, False, True),
    "op_z2_2": ("lgtm", 2, 2, 1, False, True),
    "op_z3_3": ("lgtm", 3, 3, 1, False, True),  # ZeRO-3: parameters gathered once per call
    "op_z3_3_perfwd": ("lgtm", 3, 3, 1, False, False),  # per forward, synced_gpus across ranks
    "op_online_z3_2_gas2": ("online_kd", 3, 2, 2, False, True),
    "op_seqkd_z3_3": ("online_kd", 3, 3, 1, True, True),  # the ZeRO-3 teacher generates
}


class Tok:
    name_or_path = "stub"
    pad_token_id = 0

    def __init__(self, eos):
        self.eos_token_id = eos

    def __len__(self):
        return LM_VOCAB


def eos_token() -> int:
    """A token the initial student emits greedily right after the first prompt of step 0: as
    EOS, rows stop at different lengths."""
    _, student = _models("gpt2")
    prompt = batch_prompts(lm_batch(GLOBAL_BATCH, 1000))[0]
    with torch.no_grad():
        return int(student(input_ids=torch.tensor([prompt])).logits[0, -1].argmax())


def _keys(seq_kd, gather=True):
    gen = {"temperature": 0.0, "max_new_tokens": MAX_NEW, "zero3_gather": gather}
    return dict(lmbda=0.0 if seq_kd else 1.0, seq_kd=seq_kd, generation=gen)


def _count_generated(d):
    """Record the generated tokens of every micro-batch the method gets."""
    counts, orig = [], d.method.step

    def step(micro, quiz):
        counts.append(sum(int(mb["labels"].ne(IGNORE).sum()) for mb in micro))
        return orig(micro, quiz)

    d.method.step = step
    return counts


def run_case(name, rank, world, eos):
    method, ts, ss, gas, seq_kd, gather = CASES[name]
    teacher, student = _models("gpt2")
    init = {
        "teacher": [p.detach().clone() for p in teacher.parameters()],
        "student": [p.detach().clone() for p in student.parameters()],
    }
    micro = GLOBAL_BATCH // world // gas
    engines = {}
    for role, model, stage, lr in (("teacher", teacher, ts, 3e-3), ("student", student, ss, 5e-3)):
        opt = build_adamw(model, lr, 0.01)
        cfg = ds_config(stage, "fp32", micro, gas, world, None, role)
        engines[role] = build_engine(model, opt, warmup_linear(opt, 10, 0.2), cfg, role)
    d = Distiller(
        method,
        teacher=engines["teacher"],
        student=engines["student"],
        task=get_task("causal_lm")(),
        fused_head=False,
        tokenizer=Tok(eos),
        **_keys(seq_kd, gather),
    )
    counts = _count_generated(d)
    gen_s = 0.0
    for step in range(STEPS):
        train, quiz = batches(step, rank, world, gas)
        gen_s += d.step(train, quiz if d.method.needs_quiz else None).get("gen_s", 0.0)
    return {
        "gen_s": gen_s,  # this rank's seconds in generation over the steps
        "teacher": full_params(engines["teacher"]),
        "student": full_params(engines["student"]),
        "init": init,
        "generated": counts,  # rank 0's
    }, counts


def run_torch(method, seq_kd, eos):
    """The plain-module path, one micro-batch of the whole global batch."""
    teacher, student = _models("gpt2")
    d = make_distiller(
        method,
        teacher,
        student,
        **PLAIN,
        max_grad_norm=1.0,
        task=get_task("causal_lm")(),
        fused_head=False,
        tokenizer=Tok(eos),
        **_keys(seq_kd),
    )
    for step in range(STEPS):
        train, quiz = batches(step, 0, 1, 1)
        d.step(train, quiz if d.method.needs_quiz else None)
    return {
        "teacher": [p.detach().float().clone() for p in teacher.parameters()],
        "student": [p.detach().float().clone() for p in student.parameters()],
    }


def main():
    import torch.distributed as dist

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()
    rank, world = init_distributed(timeout_s=300)
    eos = eos_token()
    for name in CASES:
        try:
            res, counts = run_case(name, rank, world, eos)
            every = [None] * world
            dist.all_gather_object(every, counts)
            res["generated_per_rank"] = every
        except Exception:
            traceback.print_exc()
            res = {"error": "crash: " + traceback.format_exc(limit=3)}
        if rank == 0:
            torch.save(res, os.path.join(args.out, f"{name}.w{world}.pt"))
    if rank == 0:
        ref = {
            "lgtm": run_torch("lgtm", False, eos),
            "online_kd": run_torch("online_kd", False, eos),
            "online_kd_seqkd": run_torch("online_kd", True, eos),
        }
        torch.save(ref, os.path.join(args.out, f"torch.w{world}.pt"))
    print(f"rank {rank}: done", flush=True)
    shutdown_distributed()


if __name__ == "__main__":
    main()
