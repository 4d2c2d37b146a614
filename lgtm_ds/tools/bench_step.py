"""ms/step and peak memory of every registered method and the naive reference form of LGTM,
same models, same run. One child process per measurement (clean peak memory), one CSV row
each, a table last.

    python launch/bench_step.py                        # CPU-sized embedded BERTs
    python launch/bench_step.py --preset bert-base     # BERT-base -> 6-layer BERT (GPU)
    python launch/bench_step.py --preset decoder-cpu   # Llama-shaped decoders, token level
    python launch/bench_step.py --preset decoder-1b    # 1.24B -> 0.13B Llama, V = 128256 (GPU)
    python launch/bench_step.py --preset decoder-mem --exact-rss [--fused-head off]  # memory

Decoders run with the fused head (``model.fused_head``, no full logits) unless ``--fused-head
off``. ``growth_mib``: the peak memory of the measured steps beyond what the process held after
the warm-up (models, optimizer state, batches): CUDA max allocated minus allocated, CPU peak RSS
(VmHWM, reset after the warm-up) minus RSS; ``x_nv``: that growth in fp32 ``[tokens, V]``
buffers, ``tokens`` = the loss tokens of one step.

Models, optimizers, DeepSpeed dicts and engines are built exactly as the trainer builds them
(``Task.build_model``, ``lgtm_ds.engines.build``), from the default experiment config with the
benchmark's batch, precision and the reference learning rates; the data are random tokens.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# name: (task type, teacher, student, batch, seq, vocabulary); embedded models are built from
# configs (no download). Decoder batches: every token but a 1/4 prompt carries a loss.
PRESETS = {
    "cpu": ("classification", "embedded:teacher", "embedded:student", 32, 64, 30522),
    "bert-base": ("classification", "embedded:bert-base", "embedded:bert-6l", 32, 128, 30522),
    # teacher 1.43M ~ 7x the student's 0.20M parameters
    "decoder-cpu": ("causal_lm", "embedded:teacher", "embedded:student", 16, 64, 1000),
    "decoder-1b": ("causal_lm", "embedded:llama-1b", "embedded:llama-125m", 8, 1024, 128256),
    # the memory table: tiny bodies (H = 16), so the vocabulary decides; 16 x 344 -> 4112 loss
    # tokens (--batch / --seq / --vocab for the other sizes)
    "decoder-mem": ("causal_lm", "embedded:tiny", "embedded:tiny", 16, 344, 32000),
    # the extra memory per rank of the student-side passes, in fp32 student copies: a 50M
    # student, a tiny teacher and a short batch, so that the student's size decides
    # (--ranks 2 --ds_config ds_configs/zero3.json for ZeRO-3 across two ranks)
    "decoder-zero": ("causal_lm", "embedded:tiny", "embedded:wide", 2, 64, 1000),
    # LoRA memory (launch/bench_memory.py): a 50M teacher, 250x the 0.20M student, so that the
    # teacher's weights, gradients and optimizer state decide
    "decoder-peft": ("causal_lm", "embedded:wide", "embedded:student", 4, 64, 1000),
}
PEFT_SIDES = ("none", "teacher", "student", "both")  # --peft: which models get LoRA adapters
LABELS = 3
NAIVE = "naive"  # the reference form of LGTM (lgtm_ds.methods.naive), plain modules


def _method_names() -> list[str]:
    from lgtm_ds.methods import method_names

    return [*method_names(), NAIVE]


def child(args) -> dict:
    import torch

    from lgtm_ds.config import load_config
    from lgtm_ds.engines.build import build_engines, resolve_ds_configs
    from lgtm_ds.engines.optim import build_adamw
    from lgtm_ds.methods import Distiller, get_method
    from lgtm_ds.methods.naive import naive_lgtm_step
    from lgtm_ds.tasks import get_task
    from lgtm_ds.tasks.adapters import AdapterOptions, apply_adapters
    from lgtm_ds.tasks.base import ModelOptions

    task_type, t_name, s_name, batch, seq, vocab = PRESETS[args.preset]
    batch, seq, vocab = args.batch or batch, args.seq or seq, args.vocab or vocab
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    method = args.method
    n_steps = args.warmup + args.steps
    cfg = load_config(
        None,
        [
            f"method.name={'lgtm' if method == NAIVE else method}",
            f"train.micro_batch_size={batch}",
            "train.gradient_accumulation_steps=1",
            "train.max_grad_norm=0",
            "train.student_lr=5e-5",
            "train.teacher_lr=3e-5",
            "train.weight_decay=0.01",
            f"train.precision={args.precision}",
            f"data.task_type={task_type}",
            *([f"deepspeed.config={args.ds_config}"] if args.ds_config else []),
        ],
    )
    decoder = task_type == "causal_lm"
    task = get_task(task_type)(num_labels=None if decoder else LABELS)
    options = ModelOptions(vocab_size=vocab, seed=0)
    if decoder:
        task.max_length = seq  # positions for the embedded decoders (and check_pair's rule)
    _load_runtime(
        task,
        "embedded:tiny" if decoder else "embedded:student",
        options,
        seq,
        checkpointing=args.teacher_checkpointing,
    )
    # before any model: the runtime's own memory, left out of total_mib
    base = torch.cuda.memory_allocated() if dev.type == "cuda" else _status("VmRSS")
    teacher = task.build_model(t_name, role="teacher", options=options)
    student = task.build_model(s_name, role="student", options=options)
    teacher, student = (  # as the trainer applies model.<role>_peft (default rank, targets)
        apply_adapters(
            m,
            AdapterOptions(enabled=args.peft in (role, "both")),
            key=f"model.{role}_peft",
            name=name,
            seed=7,
        ).to(dev)
        for role, m, name in (("teacher", teacher, t_name), ("student", student, s_name))
    )
    if args.teacher_checkpointing:  # model.teacher_gradient_checkpointing
        from lgtm_ds.training.trainer import _checkpoint_activations

        _checkpoint_activations(teacher)
    student_bytes = 4 * sum(p.numel() for p in student.parameters())  # one fp32 copy
    on_deepspeed = args.engine == "deepspeed" and method != NAIVE
    if args.precision == "bf16" and not on_deepspeed:
        teacher, student = teacher.bfloat16(), student.bfloat16()
    g = torch.Generator().manual_seed(0)

    def data(n):
        out = []
        for _ in range(n):
            ids = torch.randint(0, vocab, (batch, seq), generator=g)
            if decoder:
                labels = ids.clone()
                labels[:, : seq // 4] = -100  # a prompt
            else:
                labels = torch.randint(0, LABELS, (batch,), generator=g)
            mask = torch.ones(batch, seq, dtype=torch.long)
            out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
        return [{k: v.to(dev) for k, v in b.items()} for b in out]

    zero_stage = ""  # "teacher/student" on DeepSpeed engines
    if method == NAIVE:
        t_opt = build_adamw(teacher, cfg.train.teacher_lr, cfg.train.weight_decay)
        s_opt = build_adamw(student, cfg.train.student_lr, cfg.train.weight_decay)
    else:
        ds_configs = None
        if on_deepspeed:
            from lgtm_ds.engines.dist import init_distributed

            _, world = init_distributed()
            ds_configs = resolve_ds_configs(cfg, world)  # as the trainer resolves them
        te, se = build_engines(
            cfg,
            teacher,
            student,
            # a teacher that never learns (vanilla KD's stage 2) is frozen, as the trainer
            # builds it: no optimizer
            teacher_steps=n_steps if get_method(method).trains_teacher else 0,
            student_steps=n_steps,
            ds_configs=ds_configs,
        )
        zero_stage = "/".join(str(getattr(e, "stage", "")) for e in (te, se))  # teacher/student
        d = Distiller(
            config=cfg.method,
            teacher=te,
            student=se,
            task=task,
            fused_head=args.fused_head == "on",
        )

    batches, quiz = data(n_steps), data(n_steps)

    def one(i):  # the same hyper-parameters (cfg.method) for every method
        if method == NAIVE:
            c = cfg.method
            naive_lgtm_step(
                teacher, student, t_opt, s_opt, batches[i], quiz[i], task=task, config=c
            )
        else:
            d.step(batches[i], quiz[i])

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for i in range(args.warmup):
        one(i)
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak (VmHWM) restarts from the current RSS
        held = _status("VmRSS")
    times = []
    for i in range(args.warmup, n_steps):
        t0 = time.perf_counter()
        one(i)
        sync()  # note: host sync, per step, for timing
        times.append((time.perf_counter() - t0) * 1e3)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        growth = torch.cuda.max_memory_allocated() - held
        total = torch.cuda.max_memory_allocated() - base
        device = torch.cuda.get_device_name()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB, process
        growth = _status("VmHWM") - held
        total = _status("VmHWM") - base
        device = f"cpu x{torch.get_num_threads()} threads"
    tokens = task.count_rows(batches[0]) if decoder else batch
    width = vocab if decoder else LABELS
    fused = method != NAIVE and any(e.fused_head for e in (d.teacher, d.student))
    q = statistics.quantiles(times, n=5) if len(times) >= 5 else [min(times)] * 4
    return {
        "method": method,
        "ms_median": statistics.median(times),
        "ms_p20": q[0],
        "ms_p80": q[3],
        "peak_mib": peak,
        "device": device,
        "batch": batch,
        "seq": seq,
        "vocab": vocab,
        "tok_per_s": batch * seq / statistics.median(times) * 1e3,
        "fused_head": fused,
        "zero_stage": zero_stage,
        "growth_mib": growth / 2**20,
        "x_nv": growth / (tokens * width * 4),
        "x_student": growth / student_bytes,
        "peft": args.peft,
        "teacher_checkpointing": args.teacher_checkpointing,
        "total_mib": total / 2**20,
        "trainable_teacher": sum(p.numel() for p in teacher.parameters() if p.requires_grad),
        "trainable_student": sum(p.numel() for p in student.parameters() if p.requires_grad),
    }


def _load_runtime(task, name: str, options, seq: int, *, checkpointing: bool) -> None:
    """Load what building and running a model loads lazily (transformers' model modules,
    peft, autograd's threads, the activation-checkpointing path: ~90 MiB of RSS on CPU; not
    deepspeed, which only the engine seams import), with a throwaway small model ``name`` of
    the task and one forward and backward pass on a short batch, so that the RSS taken next is
    the runtime's own."""
    import importlib.util

    import torch

    if importlib.util.find_spec("peft") is not None:
        import peft  # noqa: F401
    model = task.build_model(name, role="student", options=options)
    if checkpointing:
        from lgtm_ds.training.trainer import _checkpoint_activations

        _checkpoint_activations(model)
    ids = torch.zeros(1, min(seq, 8), dtype=torch.long)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    out.logits.float().sum().backward()
    del model, out


def _status(key: str) -> int:
    """Bytes of ``key`` (VmRSS, VmHWM) in /proc/self/status (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) * 1024 for x in f if x.startswith(key + ":"))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _commit() -> str:
    try:
        return (
            subprocess.run(
                ["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
            ).stdout.strip()
            or "unknown"
        )
    except OSError:
        return "unknown"


# what identifies a measurement's run (the first columns of bench_step's and bench_memory's CSVs)
RUN_COLUMNS = [
    "date",
    "commit",
    "machine",
    "device",
    "engine",
    "preset",
    "precision",
    "batch",
    "seq",
]
CSV_HEADER = [
    *RUN_COLUMNS,
    "method",
    "ms_median",
    "ms_p20",
    "ms_p80",
    "x_vanilla",
    "peak_mib",
    "tok_per_s",
    "vocab",
    "fused_head",
    "growth_mib",
    "x_nv",
    "zero_stage",
    "ranks",
    "x_student",
    "peft",
    "teacher_checkpointing",
]


def _run_child(method: str, args) -> dict | None:
    """One measurement: ``args.ranks`` child processes (one rank each, a process group of
    their own). Rank 0's row, with the largest memory growth of any rank."""
    cmd = [sys.executable, "-m", "lgtm_ds.tools.bench_step", "--method", method]
    for key in ("preset", "engine", "precision", "batch", "seq", "vocab", "steps", "warmup"):
        cmd += [f"--{key}", str(getattr(args, key))]
    if args.ds_config:
        cmd += ["--ds_config", args.ds_config]
    cmd += ["--fused-head", args.fused_head, "--peft", getattr(args, "peft", "none")]
    if getattr(args, "teacher_checkpointing", False):
        cmd += ["--teacher-checkpointing"]
    port = str(free_port())
    procs = []
    for rank in range(args.ranks):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(args.ranks),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        if args.exact_rss:
            # glibc: every allocation >= 64 KiB is its own mapping, returned to the OS on free
            # (the default threshold rises to 32 MiB after large frees, and the warm-up's
            # freed chunk buffers would stay in the RSS and hide the measured step's peak).
            env["MALLOC_MMAP_THRESHOLD_"] = "65536"
        env["PYTHONPATH"] = os.pathsep.join(
            [ROOT, os.path.join(ROOT, "kernels"), *filter(None, [env.get("PYTHONPATH")])]
        )
        procs.append(
            subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
            )
        )
    results = []
    for rank, proc in enumerate(procs):
        out, err = proc.communicate()
        lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{method} (rank {rank}): failed\n{err[-2000:]}", file=sys.stderr)
            for p in procs:
                p.kill()
            return None
        results.append(json.loads(lines[-1][7:]))
    row = dict(results[0], ranks=args.ranks)
    top = max(results, key=lambda r: r["growth_mib"])
    for key in ("growth_mib", "x_nv", "x_student"):
        row[key] = top[key]
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS), default="cpu")
    ap.add_argument(
        "--engine",
        choices=["deepspeed", "torch"],
        default="deepspeed",
        help="engines for the registered methods; naive always runs on plain modules",
    )
    ap.add_argument("--methods", default=None, help="comma-separated; default: all + naive")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--ds_config", default=None)
    ap.add_argument("--batch", type=int, default=0)
    ap.add_argument("--seq", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=0, help="decoders: output rows (0: the preset's)")
    ap.add_argument(
        "--fused-head",
        choices=["on", "off"],
        default="on",
        help="decoders: losses from hidden states, chunked (on) or from full logits (off)",
    )
    ap.add_argument(
        "--peft",
        choices=PEFT_SIDES,
        default="none",
        help="LoRA adapters (default rank and targets) on the teacher, the student or both",
    )
    ap.add_argument(
        "--teacher-checkpointing",
        action="store_true",
        help="activation checkpointing in the teacher (model.teacher_gradient_checkpointing)",
    )
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument(
        "--exact-rss",
        action="store_true",
        help="CPU memory runs: large allocations are returned to the OS on free, so growth_mib "
        "is the step's own peak (times are slower; measure time without it)",
    )
    ap.add_argument(
        "--ranks",
        type=int,
        default=1,
        help="data-parallel ranks per measurement (one process each; CPU: gloo); memory "
        "growth is the largest of any rank's",
    )
    ap.add_argument("--csv", default=os.path.join(ROOT, "benchmarks", "step.csv"))
    ap.add_argument("--method", help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.ranks < 1:
        ap.error(f"--ranks must be >= 1, got {args.ranks}")
    if args.method:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return 0

    known = _method_names()
    methods = args.methods.split(",") if args.methods else known
    for method in methods:
        if method not in known:
            print(f"error: unknown method {method!r}; choose from {known}", file=sys.stderr)
            return 2
    rows = []
    for method in methods:
        row = _run_child(method, args)
        if row is None:
            return 1
        rows.append(row)
    _write_csv(args, rows)
    _print_table(args, rows)
    return 0


def _x_vanilla(rows: list[dict]) -> list[float]:
    base = next((r["ms_median"] for r in rows if r["method"] == "vanilla_kd"), None)
    return [r["ms_median"] / base if base else float("nan") for r in rows]


def _write_csv(args, rows: list[dict]) -> None:
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    commit, machine = _commit(), f"{platform.node()} {platform.machine()}"
    os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
    new = not os.path.exists(args.csv)
    if not new:
        with open(args.csv, newline="") as fh:
            old = list(csv.reader(fh))
        if old and old[0] != CSV_HEADER:  # a column was added since: pad the old rows
            pad = {c: i for i, c in enumerate(old[0])}
            fixed = [[r[pad[c]] if c in pad else "" for c in CSV_HEADER] for r in old[1:]]
            with open(args.csv, "w", newline="") as fh:
                csv.writer(fh).writerows([CSV_HEADER, *fixed])
    with open(args.csv, "a", newline="") as fh:
        w = csv.writer(fh)
        if new:
            w.writerow(CSV_HEADER)
        for r, x in zip(rows, _x_vanilla(rows)):
            engine = "torch" if r["method"] == NAIVE else args.engine
            w.writerow(
                [
                    stamp,
                    commit,
                    machine,
                    r["device"],
                    engine,
                    args.preset,
                    args.precision,
                    r["batch"],
                    r["seq"],
                    r["method"],
                    f"{r['ms_median']:.2f}",
                    f"{r['ms_p20']:.2f}",
                    f"{r['ms_p80']:.2f}",
                    f"{x:.2f}",
                    f"{r['peak_mib']:.0f}",
                    f"{r['tok_per_s']:.0f}",
                    r.get("vocab", ""),
                    int(r.get("fused_head", False)),
                    f"{r.get('growth_mib', float('nan')):.0f}",
                    f"{r.get('x_nv', float('nan')):.3f}",
                    r.get("zero_stage", ""),
                    r.get("ranks", 1),
                    f"{r.get('x_student', float('nan')):.3f}",
                    r.get("peft", "none"),
                    int(r.get("teacher_checkpointing", False)),
                ]
            )


def _print_table(args, rows: list[dict]) -> None:
    print(
        f"\n{args.preset} preset, batch {rows[0]['batch']} x {rows[0]['seq']}, "
        f"{args.precision}, {rows[0]['device']}, engine {args.engine} (naive: plain torch), "
        f"{args.ranks} rank(s), ZeRO {rows[0].get('zero_stage') or '-'} (teacher/student)"
    )
    print(
        f"{'method':<12}{'ms/step':>10}{'p20':>9}{'p80':>9}{'x vanilla':>11}{'peak MiB':>10}"
        f"{'tokens/s':>10}{'fused':>7}{'growth MiB':>12}{'x N*V fp32':>12}{'x student':>11}"
    )
    for r, x in zip(rows, _x_vanilla(rows)):
        print(
            f"{r['method']:<12}{r['ms_median']:>10.1f}{r['ms_p20']:>9.1f}{r['ms_p80']:>9.1f}"
            f"{x:>11.2f}{r['peak_mib']:>10.0f}{r['tok_per_s']:>10.0f}"
            f"{'yes' if r['fused_head'] else 'no':>7}{r['growth_mib']:>12.0f}{r['x_nv']:>12.3f}"
            f"{r['x_student']:>11.2f}"
        )
    print("peak MiB: CUDA max allocated on GPU; process max RSS on CPU (includes the runtime).")
    print("x student: the growth in fp32 copies of the whole student (largest over ranks).")


if __name__ == "__main__":
    sys.exit(main())
