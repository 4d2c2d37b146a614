"""Runs 3 distillation steps for a list of engine configurations, in one process per rank, and
saves the final full fp32 parameters of teacher and student (rank 0) for the equivalence tests.

    deepspeed --num_gpus N tests/ds_worker.py --out DIR [--cases a,b,...]
"""

import argparse
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lgtm_ds import Distiller  # noqa: E402
from lgtm_ds.engines.deepspeed import build_engine, build_frozen_engine  # noqa: E402
from lgtm_ds.engines.dist import init_distributed, shutdown_distributed  # noqa: E402
from lgtm_ds.engines.optim import build_adamw, warmup_linear  # noqa: E402
from lgtm_ds.errors import ConfigError  # noqa: E402
from lgtm_ds.methods.lookahead import adamw_lookahead  # noqa: E402
from tests.helpers import make_distiller, random_batch, tiny_model  # noqa: E402

GLOBAL_BATCH, STEPS = 8, 3
# the plain-module reference's optimizers, as the engines' below: AdamW (teacher lr, student lr,
# weight decay) and a warmup-linear schedule over 10 steps, 20% warmup
PLAIN = dict(lrs=(3e-3, 5e-3), wd=0.01, schedule=(10, 0.2))
# name: (method, teacher stage, student stage, precision, gradient accumulation steps)
CASES = {
    "z0_0": ("lgtm", 0, 0, "fp32", 1),
    "z1_1": ("lgtm", 1, 1, "fp32", 1),
    "z2_2": ("lgtm", 2, 2, "fp32", 1),
    "z3_2": ("lgtm", 3, 2, "fp32", 1),
    "z3_1": ("lgtm", 3, 1, "fp32", 1),
    "z2_0": ("lgtm", 2, 0, "fp32", 1),
    "z2_2_gas2": ("lgtm", 2, 2, "fp32", 2),
    "z3_0_gas2": ("lgtm", 3, 0, "fp32", 2),
    "z2_0_bf16": ("lgtm", 2, 0, "bf16", 1),
    "z2_1_bf16": ("lgtm", 2, 1, "bf16", 1),
    "z1_1_bf16": ("lgtm", 1, 1, "bf16", 1),  # refused: a bf16 ZeRO-1 teacher keeps bf16 grads
    "z2_2_bf16": ("lgtm", 2, 2, "bf16", 1),
    "z3_2_bf16": ("lgtm", 3, 2, "bf16", 1),
    "online_z2_2": ("online_kd", 2, 2, "fp32", 1),
    "online_z3_2": ("online_kd", 3, 2, "fp32", 1),
    "online_z2_3": ("online_kd", 2, 3, "fp32", 1),  # a ZeRO-3 student is fine without influence
    "z2_3": ("lgtm", 2, 3, "fp32", 1),
    "vanilla_z2_2": ("vanilla_kd", 2, 2, "fp32", 1),  # frozen teacher: no optimizer, stage 0
    "vanilla_z3_3": ("vanilla_kd", 3, 3, "fp32", 1),  # frozen teacher partitioned (ZeRO-3)
    "meta_z0_0": ("metadistil", 0, 0, "fp32", 1),
    "meta_z2_2": ("metadistil", 2, 2, "fp32", 1),
    "meta_z2_3": ("metadistil", 2, 3, "fp32", 1),  # the pilot's JVP with ZeRO-3 hooks off
    "z0_3_gas2": ("lgtm", 0, 3, "fp32", 2),
    "z2_3_np": ("lgtm", 2, 3, "fp32", 1),  # no persistent params: every forward re-gathers
    "z3_3": ("lgtm", 3, 3, "fp32", 1),  # two ZeRO-3 engines in one process
    "z2_3_bf16": ("lgtm", 2, 3, "bf16", 1),  # influence passes on fp32 tensors, hooks off
    "infl_bf16_z2": None,  # the influence part of the bf16 teacher gradient (ZeRO-2 teacher)
    "infl_bf16_z3": None,
    "meta_bf16_z2": None,  # the same for MetaDistil's meta-gradient beside the teacher's CE
    "meta_bf16_z3": None,
    "state_z0": None,  # the look-ahead's inputs (masters, moments) read through each ZeRO stage
    "state_z1": None,
    "state_z2": None,
    "state_z3": None,
    "sharded_z3": None,  # the ZeRO-3 influence passes on partitions vs on full tensors
    "sharded_z3_bf16": None,
    "external_z3": None,  # a parameter read outside its module: the full-tensor path
}


def ds_config(stage, precision, micro, gas, world, persistence=None, role="student"):
    zero = {"stage": stage}
    if persistence is not None:
        zero["stage3_param_persistence_threshold"] = persistence
    extra = {}
    if precision == "bf16" and role == "teacher" and stage >= 2:
        extra["data_types"] = {"grad_accum_dtype": "fp32"}  # as the trainer sets for bf16 LGTM
    return {
        **extra,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "train_batch_size": micro * gas * world,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
    }


def batches(step, rank, world, gas):
    """This rank's micro-batches of global batch ``step`` (train and quiz)."""
    out = []
    for seed in (1000 + step, 2000 + step):
        b = random_batch(GLOBAL_BATCH, seed)
        mine = {k: v[rank::world] for k, v in b.items()}
        n = GLOBAL_BATCH // world // gas
        out.append([{k: v[i * n : (i + 1) * n] for k, v in mine.items()} for i in range(gas)])
    return out


def local_storage(p):
    """What this rank stores of a parameter: its ZeRO-3 shard, else the full tensor."""
    return (p.ds_tensor if hasattr(p, "ds_tensor") else p).detach()


def gathered_params(adapter):
    """An optimizer-less engine's parameters, whole (gathered at ZeRO-3)."""
    import deepspeed

    params = list(adapter.module.parameters())
    on = any(hasattr(p, "ds_tensor") for p in params)
    with deepspeed.zero.GatheredParameters(params, enabled=on):
        return [p.detach().float().cpu().clone() for p in params]


def full_params(adapter):
    from deepspeed.utils import safe_get_full_fp32_param

    out = []
    for p in adapter.module.parameters():
        full = safe_get_full_fp32_param(p)  # collective under ZeRO-1/2/3 and bf16
        out.append((full if full is not None else p.detach()).float().cpu().clone())
    return out


def run_case(name, rank, world):
    method, ts, ss, precision, gas = CASES[name]
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    teacher, student = tiny_model(seed=1, size="student"), tiny_model(seed=2)
    init = {
        "teacher": [p.detach().clone() for p in teacher.parameters()],
        "student": [p.detach().clone() for p in student.parameters()],
    }
    micro = GLOBAL_BATCH // world // gas
    engines = {}
    for role, model, stage, lr in (("teacher", teacher, ts, 3e-3), ("student", student, ss, 5e-3)):
        conf = ds_config(
            stage, precision, micro, gas, world, 0 if name.endswith("_np") else None, role
        )
        if role == "teacher" and method == "vanilla_kd":  # as the trainer builds it
            engines[role] = build_frozen_engine(model, conf, role)
            continue
        opt = build_adamw(model, lr, 0.01)
        engines[role] = build_engine(model, opt, warmup_linear(opt, 10, 0.2), conf, role)
    d = Distiller(method, teacher=engines["teacher"], student=engines["student"])
    restored = True
    influence, radii = [], []
    for step in range(STEPS):
        train, quiz = batches(step, rank, world, gas)
        if method == "lgtm":
            before = [local_storage(p).clone() for p in student.parameters()]
            m = d.method.teacher_update(train, quiz)
            restored &= all(
                torch.equal(local_storage(p), b) for p, b in zip(student.parameters(), before)
            )
            influence.append(m["influence"])
            radii.append(m["fd_R"])
        else:
            d.method.teacher_update(train, quiz if d.method.needs_quiz else None)
        d.method.student_update(train)
    assert all(p.dtype == dtype for p in student.parameters())
    import deepspeed.comm as dist

    all_radii = [None] * world
    dist.all_gather_object(all_radii, radii)  # R = r / ||v|| must agree bitwise on all ranks
    frozen = engines["teacher"].frozen
    assert not frozen or engines["teacher"].engine.basic_optimizer is None
    return {
        "radius_agrees": all(r == all_radii[0] for r in all_radii),
        "radii": radii,
        "teacher_stage": engines["teacher"].stage,
        "teacher": gathered_params(engines["teacher"])
        if frozen
        else full_params(engines["teacher"]),
        "student": full_params(engines["student"]),
        "init": init,
        "restored": restored,
        "influence": torch.cat(influence) if influence else None,
    }


def influence_gradient(teacher_stage, rank, world, method="lgtm"):
    """The influence part of the teacher gradient (G with eta minus G with eta = 0, one LGTM
    step) of a bf16 engine pair vs float64 plain modules: its cosine and norm ratio.
    ``method="metadistil"``: the meta-gradient part (G with the pilot's lr minus G with
    pilot_lr = 0) of a teacher that also learns from its own CE (teacher_ce_weight 0.5)."""
    from deepspeed.utils import safe_get_full_grad

    from lgtm_ds.engines import TorchEngine

    def run(engine_kind, eta_on):
        teacher, student = tiny_model(seed=1, size="student"), tiny_model(seed=2)
        captured = {}
        if engine_kind == "ds":
            t_opt, s_opt = build_adamw(teacher, 3e-3, 0.01), build_adamw(student, 5e-3, 0.01)
            micro = GLOBAL_BATCH // world
            te = build_engine(
                teacher,
                t_opt,
                None,
                ds_config(teacher_stage, "bf16", micro, 1, world, role="teacher"),
                "teacher",
            )
            se = build_engine(
                student, s_opt, None, ds_config(2, "bf16", micro, 1, world), "student"
            )
            orig = te.step

            def step():
                if te.engine.is_gradient_accumulation_boundary():
                    captured["G"] = [
                        safe_get_full_grad(p).double().cpu().clone() for p in teacher.parameters()
                    ]
                orig()

            te.step = step
            train, quiz = batches(0, rank, world, 1)
        else:
            teacher, student = teacher.double(), student.double()
            t_opt, s_opt = build_adamw(teacher, 3e-3, 0.01), build_adamw(student, 5e-3, 0.01)
            te, se = TorchEngine(teacher, t_opt), TorchEngine(student, s_opt)
            orig = t_opt.step

            def opt_step(*a, **k):
                captured["G"] = [p.grad.detach().clone() for p in teacher.parameters()]
                return orig(*a, **k)

            t_opt.step = opt_step
            train, quiz = batches(0, 0, 1, 1)
        hp = {}
        if method == "metadistil":  # pilot_lr 0: no meta-gradient, the teacher's CE unchanged
            hp = dict(teacher_ce_weight=0.5, pilot_lr=None if eta_on else 0.0)
        elif not eta_on:
            te.lr = lambda: 0.0  # eta = 0: the influence term vanishes, the rest is unchanged
        calls = []
        hook = teacher.register_forward_pre_hook(lambda *_: calls.append(1))
        Distiller(method, teacher=te, student=se, **hp).method.teacher_update(train, quiz)
        hook.remove()
        captured["forwards"] = len(calls)
        return captured

    on, off = run("ds", True), run("ds", False)
    diff = [a - b for a, b in zip(on["G"], off["G"])]
    if rank != 0:
        return {}
    ref = [a - b for a, b in zip(run("torch", True)["G"], run("torch", False)["G"])]
    d, r = torch.cat([x.reshape(-1) for x in diff]), torch.cat([x.reshape(-1) for x in ref])
    return {
        "cos": float(torch.nn.functional.cosine_similarity(d, r, dim=0)),
        "norm_ratio": float(d.norm() / r.norm()),
        "forwards": on["forwards"],  # teacher forwards in one LGTM teacher update
    }


def _after_two_lgtm_steps(student_stage, precision, rank, world):
    """(Distiller, student engine) after 2 LGTM steps: a ZeRO-2 teacher, the student at
    ``student_stage`` (optimizer state exists)."""
    teacher, student = tiny_model(seed=1, size="student"), tiny_model(seed=2)
    micro = GLOBAL_BATCH // world
    engines = {}
    for role, model, stage, lr in (
        ("teacher", teacher, 2, 3e-3),
        ("student", student, student_stage, 5e-3),
    ):
        opt = build_adamw(model, lr, 0.01)
        engines[role] = build_engine(
            model, opt, None, ds_config(stage, precision, micro, 1, world, role=role), role
        )
    d = Distiller("lgtm", teacher=engines["teacher"], student=engines["student"])
    for step in range(2):
        train, quiz = batches(step, rank, world, 1)
        d.step(train, quiz)
    return d, engines["student"]


def student_state(student_stage, precision, rank, world):
    """After 2 LGTM steps: the student's masters and Adam moments as the DeepSpeed adapter reads
    them (the look-ahead's inputs) vs the plain-module twin's. Max relative error per kind."""
    _, se = _after_two_lgtm_steps(student_stage, precision, rank, world)
    got = {"master": se.master_params(), **dict(zip(("m", "v"), _moments(se.adam_state())))}
    got["step"] = se.adam_state().step
    # the look-ahead on this rank's moment partitions + one gather vs on gathered moments
    gen = torch.Generator().manual_seed(7)  # the same g on every rank
    g = [torch.randn(p.shape, generator=gen) * 1e-2 for p in got["master"]]
    mine = se.lookahead(got["master"], g, adamw_lookahead)
    full = adamw_lookahead(got["master"], g, se.adam_state())
    a, b = (torch.cat([x.reshape(-1).double() for x in xs]) for xs in (mine, full))
    lookahead_err = float((a - b).abs().max() / b.abs().max())
    # reuse_g (LGTM's call): the same values, where the engine may write them into g
    spent = [x.clone() for x in g]
    reused = se.lookahead(got["master"], spent, adamw_lookahead, reuse_g=True)
    same = all(torch.equal(x, y) for x, y in zip(reused, mine))
    lookahead_err = lookahead_err if same else float("inf")
    if rank != 0:
        return {}
    t2, s2 = tiny_model(seed=1, size="student"), tiny_model(seed=2)
    to, so = build_adamw(t2, 3e-3, 0.01), build_adamw(s2, 5e-3, 0.01)
    d2 = Distiller(
        "lgtm",
        teacher=t2,
        student=s2,
        teacher_optimizer=to,
        student_optimizer=so,
        max_grad_norm=1.0,
    )  # as ds_config's gradient_clipping
    for step in range(2):
        train, quiz = batches(step, 0, 1, 1)
        d2.step(train, quiz)
    ref = d2.student
    want = {"master": ref.master_params(), **dict(zip(("m", "v"), _moments(ref.adam_state())))}
    out = {"step": got["step"], "ref_step": ref.adam_state().step, "lookahead": lookahead_err}
    for k in ("master", "m", "v"):
        a = torch.cat([x.reshape(-1).double().cpu() for x in got[k]])
        b = torch.cat([x.reshape(-1).double().cpu() for x in want[k]])
        out[k] = float((a - b).norm() / b.norm())
    return out


def sharded_passes(precision, rank, world):
    """A ZeRO-3 student after 2 LGTM steps: each influence pass on this rank's partitions
    (``Sharded``: LGTM's path) vs the same pass on full tensors (the 0.8 path), the
    partitioned results all-gathered. Steps A (the KD gradient ``g``), B (look-ahead), C
    (``v``, plain and with activation checkpointing; A again with it), the norm of ``v`` and D
    (a perturbed forward). Max relative errors."""
    from lgtm_ds.engines.base import Sharded
    from lgtm_ds.training.trainer import _checkpoint_activations

    d, se = _after_two_lgtm_steps(3, precision, rank, world)
    params = se.params()

    def full(xs):
        return [se.zero3.gather_one(p, x) for p, x in zip(params, xs)]

    def rel(a, b):
        a, b = (torch.cat([x.reshape(-1).double() for x in xs]) for xs in (a, b))
        return float((a - b).abs().max() / b.abs().max())

    # A: the student's KD gradient through the shards (partitioned_backward) vs full tensors
    from lgtm_ds.methods.lgtm import student_grad

    train, _ = batches(4, rank, world, 1)
    grads = {}
    for sharded in (False, True):
        torch.manual_seed(2)
        grads[sharded], _ = student_grad(d, train, [1.0], False, sharded=sharded)
    out = {
        "is_sharded": isinstance(grads[True], Sharded),
        "g": rel(full(grads[True]), grads[False]),
    }
    gen = torch.Generator().manual_seed(7)  # the same g on every rank
    g = [torch.randn(p.ds_shape, generator=gen) * 1e-2 for p in params]
    look = se.lookahead(None, [x.clone() for x in g], adamw_lookahead)
    look_sh = se.lookahead(None, [x.clone() for x in g], adamw_lookahead, True, sharded=True)
    out["is_sharded"] &= isinstance(look_sh, Sharded)
    out["lookahead"] = rel(full(look_sh), look)
    train, quiz = batches(5, rank, world, 1)
    loss_fn = lambda logits, b: d.task.task_loss(logits, b["labels"])  # noqa: E731
    se.module.train()
    for tag in ("v", "v_ckpt"):
        if tag == "v_ckpt":
            _checkpoint_activations(se.module)
        torch.manual_seed(3)
        v, _ = se.grad_at(look, quiz, loss_fn)
        se.all_reduce_mean_(v)
        torch.manual_seed(3)
        v_sh, _ = se.grad_at(look_sh, quiz, loss_fn)
        se.all_reduce_mean_(v_sh)  # a no-op on a Sharded gradient
        out[tag] = rel(full(v_sh), v)
        out["is_sharded"] &= isinstance(v_sh, Sharded)
    # step A with activation checkpointing: the recomputation gathers again
    train_a, _ = batches(4, rank, world, 1)
    for sharded in (False, True):
        torch.manual_seed(2)
        grads[sharded], _ = student_grad(d, train_a, [1.0], False, sharded=sharded)
    out["g_ckpt"] = rel(full(grads[True]), grads[False])
    out["norm"] = abs(se.sq_norm(v_sh) / se.sq_norm(v) - 1)
    theta, theta_sh = se.master_params(), se.master_params(sharded=True)
    with torch.no_grad():
        torch.manual_seed(4)
        s = se.forward_perturbed(theta, v, 0.1, train[0])
        torch.manual_seed(4)
        s_sh = se.forward_perturbed(theta_sh, v_sh, 0.1, train[0])
    out["forward"] = rel([s_sh], [s])
    out["per_module"] = se._perturb_lazily is True
    return out


class ReadsAChildsWeight(torch.nn.Module):
    """A classifier whose forward reads a child's parameter outside the child's forward (its
    ZeRO-3 placeholder, were the partitioned passes used)."""

    def __init__(self, inner):
        from deepspeed.runtime.zero import register_external_parameter

        super().__init__()
        self.inner = inner
        self.extra = torch.nn.Linear(4, 3)
        # how DeepSpeed's own ZeRO-3 forward learns to gather it (ZeRO-0-2: no effect)
        register_external_parameter(self, self.extra.weight)

    def forward(self, **kw):
        return self.inner(**kw).logits + self.extra.weight.sum()


def external_read(rank, world):
    """ZeRO-3 student that reads a parameter outside its module's forward: the first LGTM step
    gives the partitioned passes up (and repeats step A on full tensors, same dropout masks);
    3 steps then match a run that took the full-tensor path from the start."""
    out = {}
    for forced in (False, True):
        torch.manual_seed(0)
        teacher = tiny_model(seed=1, size="student")
        student = ReadsAChildsWeight(tiny_model(seed=2))
        engines = {}
        for role, model, stage, lr in (
            ("teacher", teacher, 2, 3e-3),
            ("student", student, 3, 5e-3),
        ):
            opt = build_adamw(model, lr, 0.01)
            engines[role] = build_engine(
                model, opt, None, ds_config(stage, "fp32", GLOBAL_BATCH // world, 1, world), role
            )
        if forced:
            engines["student"].zero3.partitioned = False
        d = Distiller("lgtm", teacher=engines["teacher"], student=engines["student"])
        for step in range(STEPS):
            train, quiz = batches(step, rank, world, 1)
            d.step(train, quiz)
        out[forced] = full_params(engines["student"])
        out[f"partitioned_{forced}"] = engines["student"].zero3.partitioned
    a, b = (torch.cat([x.reshape(-1).double() for x in out[k]]) for k in (False, True))
    return {"rel": float((a - b).norm() / b.norm()), "partitioned": out["partitioned_False"]}


def _moments(state):
    return state.exp_avg, state.exp_avg_sq


def run_torch(method, gas=1):
    """The plain-module path over the whole global batch (reference for every case)."""
    teacher, student = tiny_model(seed=1, size="student"), tiny_model(seed=2)
    d = make_distiller(
        method, teacher, student, **PLAIN, gradient_accumulation_steps=gas, max_grad_norm=1.0
    )
    for step in range(STEPS):
        train, quiz = batches(step, 0, 1, gas)
        d.step(train, quiz)
    return {
        "teacher": [p.detach().clone() for p in teacher.parameters()],
        "student": [p.detach().clone() for p in student.parameters()],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()
    rank, world = init_distributed(timeout_s=300)
    tag = f"w{world}"
    for name in args.cases.split(","):
        try:
            if name.startswith("infl_bf16_z"):
                res = influence_gradient(int(name[-1]), rank, world)
            elif name.startswith("meta_bf16_z"):
                res = influence_gradient(int(name[-1]), rank, world, "metadistil")
            elif name == "external_z3":
                res = external_read(rank, world)
            elif name.startswith("sharded_z3"):
                prec = "bf16" if name.endswith("bf16") else "fp32"
                res = sharded_passes(prec, rank, world)
            elif name.startswith("state_z"):
                res = student_state(int(name[7]), "fp32", rank, world)
            else:
                res = run_case(name, rank, world)
        except ConfigError as e:
            res = {"error": str(e)}
        except Exception:
            traceback.print_exc()
            res = {"error": "crash: " + traceback.format_exc(limit=3)}
        if rank == 0:
            torch.save(res, os.path.join(args.out, f"{name}.{tag}.pt"))
    if rank == 0:
        torch.save(
            {
                "lgtm": run_torch("lgtm"),
                "online_kd": run_torch("online_kd"),
                "metadistil": run_torch("metadistil"),
                "vanilla_kd": run_torch("vanilla_kd"),
                "lgtm_gas2": run_torch("lgtm", gas=2),
            },
            os.path.join(args.out, f"torch.{tag}.pt"),
        )
    print(f"rank {rank}: done", flush=True)
    shutdown_distributed()


if __name__ == "__main__":
    main()
