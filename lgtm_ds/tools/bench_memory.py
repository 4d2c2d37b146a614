"""Peak memory of a step with LoRA adapters against a frozen teacher, same models, same run:
the point of ``model.teacher_peft`` (docs/adapters.md). One fresh child process per case
(``lgtm_ds.tools.bench_step``), one CSV row each, a table last.

    python launch/bench_memory.py                       # decoder-peft: 50M -> 0.20M decoders
    python launch/bench_memory.py --engine deepspeed    # the same on DeepSpeed engines

Cases: vanilla KD stage 2 (the teacher frozen: no gradient, no optimizer state), LGTM with a
LoRA teacher, LGTM with the whole teacher trained, LGTM with LoRA on both sides, LGTM with a LoRA
teacher and activation checkpointing in the teacher, and online KD (its step time is the
reference for the LoRA teacher's). ``total_mib``: the peak memory of the measured steps
beyond what the process held before the models were built (CPU: peak RSS, VmHWM, minus the RSS
after the imports and a throwaway tiny model; CUDA: max allocated), so models, gradients,
optimizer state and the step's own buffers all count and the runtime does not (DeepSpeed
engines: deepspeed's import, the process group and the engine setup do). Freed buffers are
returned to the OS (``--exact-rss``), so the RSS follows what is live.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import sys

from lgtm_ds.tools.bench_step import PRESETS, ROOT, RUN_COLUMNS, _commit, _run_child

# (case, method, peft, teacher activation checkpointing); the first is the reference of
# x_frozen, LORA_TEACHER's time is compared with ONLINE's
CASES = [
    ("frozen teacher (vanilla KD stage 2)", "vanilla_kd", "none", False),
    ("LGTM, LoRA teacher", "lgtm", "teacher", False),
    ("LGTM, full teacher", "lgtm", "none", False),
    ("LGTM, LoRA both sides", "lgtm", "both", False),
    ("LGTM, LoRA teacher, checkpointed", "lgtm", "teacher", True),
    ("online KD", "online_kd", "none", False),
]
LORA_TEACHER, ONLINE = "LGTM, LoRA teacher", "online KD"

CSV_HEADER = [
    *RUN_COLUMNS,
    "case",
    "method",
    "peft",
    "teacher_checkpointing",
    "trainable_teacher",
    "trainable_student",
    "total_mib",
    "x_frozen",
    "growth_mib",
    "ms_median",
    "x_online_kd",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS), default="decoder-peft")
    ap.add_argument(
        "--engine",
        choices=["torch", "deepspeed"],
        default="torch",
        help="torch: plain modules, AdamW state made at the first step (a frozen teacher holds "
        "none); deepspeed: the built-in ZeRO config",
    )
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--ds_config", default=None)
    ap.add_argument("--batch", type=int, default=0)
    ap.add_argument("--seq", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=0)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--csv", default=os.path.join(ROOT, "benchmarks", "memory.csv"))
    args = ap.parse_args(argv)
    # what bench_step's child runner reads
    args.fused_head, args.ranks, args.exact_rss = "on", 1, True
    rows = []
    for case, method, peft, ckpt in CASES:
        args.peft, args.teacher_checkpointing = peft, ckpt
        row = _run_child(method, args)
        if row is None:
            return 1
        rows.append(dict(row, case=case))
    _write_csv(args, rows)
    _print_table(args, rows)
    return 0


def _ratios(rows: list[dict]) -> tuple[list[float], float]:
    """x_frozen per row (total_mib over the frozen-teacher case's) and the LoRA teacher's step
    time over online KD's."""
    by = {r["case"]: r for r in rows}
    frozen = rows[0]["total_mib"]
    x_time = by[LORA_TEACHER]["ms_median"] / by[ONLINE]["ms_median"]
    return [r["total_mib"] / frozen for r in rows], x_time


def _write_csv(args, rows: list[dict]) -> None:
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    commit, machine = _commit(), f"{platform.node()} {platform.machine()}"
    os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
    new = not os.path.exists(args.csv)
    x_mem, x_time = _ratios(rows)
    with open(args.csv, "a", newline="") as fh:
        w = csv.writer(fh)
        if new:
            w.writerow(CSV_HEADER)
        for r, x in zip(rows, x_mem):
            w.writerow(
                [
                    stamp,
                    commit,
                    machine,
                    r["device"],
                    args.engine,
                    args.preset,
                    args.precision,
                    r["batch"],
                    r["seq"],
                    r["case"],
                    r["method"],
                    r["peft"],
                    int(r["teacher_checkpointing"]),
                    r["trainable_teacher"],
                    r["trainable_student"],
                    f"{r['total_mib']:.1f}",
                    f"{x:.3f}",
                    f"{r['growth_mib']:.1f}",
                    f"{r['ms_median']:.1f}",
                    f"{x_time:.3f}" if r["case"] == LORA_TEACHER else "",
                ]
            )


def _print_table(args, rows: list[dict]) -> None:
    x_mem, x_time = _ratios(rows)
    print(
        f"\n{args.preset} preset, batch {rows[0]['batch']} x {rows[0]['seq']}, {args.precision}, "
        f"{rows[0]['device']}, engine {args.engine}, one rank"
    )
    print(
        f"{'case':<38}{'trainable T':>13}{'trainable S':>13}{'peak MiB':>10}{'x frozen':>10}"
        f"{'ms/step':>10}"
    )
    for r, x in zip(rows, x_mem):
        print(
            f"{r['case']:<38}{r['trainable_teacher']:>13}{r['trainable_student']:>13}"
            f"{r['total_mib']:>10.1f}{x:>10.2f}{r['ms_median']:>10.0f}"
        )
    print(f"step time, LGTM with a LoRA teacher / online KD: {x_time:.2f}x")
    print("peak MiB: the measured steps' peak beyond the memory held before any model was built.")


if __name__ == "__main__":
    sys.exit(main())
