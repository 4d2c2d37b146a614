"""ms/step and peak memory of vanilla KD, online KD, LGTM (cheap form) and the naive reference
form, same models, same run. One child process per measurement (clean peak memory), one CSV row
each, a table last.

    python launch/bench_step.py                      # CPU-sized embedded BERTs
    python launch/bench_step.py --preset bert-base   # BERT-base -> 6-layer BERT (GPU)
"""

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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PRESETS = {
    # name: (teacher BertConfig kwargs, student kwargs, batch, seq)
    "cpu": (
        dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512),
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256),
        32,
        64,
    ),
    "bert-base": (dict(), dict(num_hidden_layers=6), 32, 128),
}
METHODS = ["vanilla_kd", "online_kd", "lgtm", "naive"]


def child(args) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification, BertConfig

    from lgtm_ds import Distiller
    from lgtm_ds.naive import naive_lgtm_step
    from lgtm_ds.optim import build_adamw

    t_kw, s_kw, batch, seq = PRESETS[args.preset]
    batch, seq = args.batch or batch, args.seq or seq
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)

    def make(kw):
        cfg = BertConfig(vocab_size=30522, num_labels=3, **kw)
        return AutoModelForSequenceClassification.from_config(cfg).to(dev)

    teacher, student = make(t_kw), make(s_kw)
    if args.precision == "bf16" and args.engine == "torch":
        teacher, student = teacher.bfloat16(), student.bfloat16()
    g = torch.Generator().manual_seed(0)

    def data(n):
        return [
            {
                "input_ids": torch.randint(0, 30522, (batch, seq), generator=g).to(dev),
                "attention_mask": torch.ones(batch, seq, dtype=torch.long, device=dev),
                "labels": torch.randint(0, 3, (batch,), generator=g).to(dev),
            }
            for _ in range(n)
        ]

    t_opt, s_opt = build_adamw(teacher, 3e-5, 0.01), build_adamw(student, 5e-5, 0.01)
    method = args.method
    if args.engine == "deepspeed" and method != "naive":
        from lgtm_ds.config import build_ds_config, load_config
        from lgtm_ds.ds_engine import build_engine, init_distributed
        from lgtm_ds.trainer import fp32_teacher_grads_

        _, world = init_distributed()
        # the DeepSpeed dicts exactly as the trainer resolves them ("auto" filled from the YAML)
        cfg = load_config(
            None,
            [
                f"method.name={method}",
                f"train.micro_batch_size={batch}",
                "train.gradient_accumulation_steps=1",
                "train.max_grad_norm=0",
                f"train.precision={args.precision}",
                *([f"deepspeed.config={args.ds_config}"] if args.ds_config else []),
            ],
        )
        ds_teacher = build_ds_config(cfg, "teacher", world)
        ds = build_ds_config(cfg, "student", world)
        if method == "lgtm" and args.precision == "bf16":
            fp32_teacher_grads_(ds_teacher)  # as the trainer does: fp32 teacher gradients
        teacher_e = build_engine(teacher, t_opt, None, ds_teacher, "teacher")
        student_e = build_engine(student, s_opt, None, ds, "student")
        d = Distiller(method, teacher=teacher_e, student=student_e)
    elif method != "naive":
        d = Distiller(
            method,
            teacher=teacher,
            student=student,
            teacher_optimizer=t_opt,
            student_optimizer=s_opt,
        )

    batches, quiz = data(args.warmup + args.steps), data(args.warmup + args.steps)

    def one(i):
        if method == "naive":
            naive_lgtm_step(teacher, student, t_opt, s_opt, batches[i], quiz[i])
        else:
            d.step(batches[i], quiz[i])

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for i in range(args.warmup):
        one(i)
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup, args.warmup + args.steps):
        t0 = time.perf_counter()
        one(i)
        sync()  # note: host sync, per step, for timing
        times.append((time.perf_counter() - t0) * 1e3)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        device = torch.cuda.get_device_name()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB, process
        device = f"cpu x{torch.get_num_threads()} threads"
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
    }


def _free_port() -> int:
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS), default="cpu")
    ap.add_argument(
        "--engine",
        choices=["deepspeed", "torch"],
        default="deepspeed",
        help="engines for vanilla/online/lgtm; naive always runs on plain modules",
    )
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--ds_config", default=None)
    ap.add_argument("--batch", type=int, default=0)
    ap.add_argument("--seq", type=int, default=0)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--csv", default=os.path.join(ROOT, "benchmarks", "step.csv"))
    ap.add_argument("--method", help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.method:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return 0

    rows = []
    for method in args.methods.split(","):
        if method not in METHODS:
            print(f"error: unknown method {method!r}; choose from {METHODS}", file=sys.stderr)
            return 2
        cmd = [sys.executable, os.path.abspath(__file__), "--method", method]
        for key in ("preset", "engine", "precision", "batch", "seq", "steps", "warmup"):
            cmd += [f"--{key}", str(getattr(args, key))]
        if args.ds_config:
            cmd += ["--ds_config", args.ds_config]
        env = dict(
            os.environ,
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
        )
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{method}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(lines[-1][7:]))
    base = next((r["ms_median"] for r in rows if r["method"] == "vanilla_kd"), None)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    commit, machine = _commit(), f"{platform.node()} {platform.machine()}"
    os.makedirs(os.path.dirname(args.csv), exist_ok=True)
    new = not os.path.exists(args.csv)
    with open(args.csv, "a", newline="") as fh:
        w = csv.writer(fh)
        if new:
            w.writerow(
                [
                    "date",
                    "commit",
                    "machine",
                    "device",
                    "engine",
                    "preset",
                    "precision",
                    "batch",
                    "seq",
                    "method",
                    "ms_median",
                    "ms_p20",
                    "ms_p80",
                    "x_vanilla",
                    "peak_mib",
                ]
            )
        for r in rows:
            engine = "torch" if r["method"] == "naive" else args.engine
            x = r["ms_median"] / base if base else float("nan")
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
                ]
            )
    print(
        f"\n{args.preset} preset, batch {rows[0]['batch']} x {rows[0]['seq']}, "
        f"{args.precision}, {rows[0]['device']}, engine {args.engine} (naive: plain torch)"
    )
    print(f"{'method':<12}{'ms/step':>10}{'p20':>9}{'p80':>9}{'x vanilla':>11}{'peak MiB':>10}")
    for r in rows:
        x = r["ms_median"] / base if base else float("nan")
        print(
            f"{r['method']:<12}{r['ms_median']:>10.1f}{r['ms_p20']:>9.1f}{r['ms_p80']:>9.1f}"
            f"{x:>11.2f}{r['peak_mib']:>10.0f}"
        )
    print("peak MiB: CUDA max allocated on GPU; process max RSS on CPU (includes the runtime).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
