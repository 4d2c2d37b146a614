"""Compare distillation methods on one experiment: every method x seed, everything else equal.

    python launch/compare.py --config my.yaml --methods vanilla_kd,online_kd,metadistil,lgtm \\
        --seeds 3 [--out compare] [--launcher "deepspeed --num_gpus 8"] [--section.key=value ...] \\
        [--variant "lgtm_x10=--method.name=lgtm --method.influence_scale=10" ...] [--jobs 2]

Each run is ``launch/train.py`` in its own process (``--launcher`` prefixes it, e.g. a
``deepspeed`` launch for more ranks) with ``--method.name``, ``--train.seed`` and
``--output.dir=<out>/<method>/seed<k>`` (and ``output.resume=auto``) added to the same config
and overrides; its console output goes to ``<run>/run.log``. A run whose ``summary.json`` says
completed is not run again, an interrupted one continues from its checkpoints (if it wrote any),
so the same command resumes a comparison. ``--jobs N`` runs N at a time (with this python;
each with cores / N threads and its own port), which on a CPU machine finishes sooner than one
run using every core. ``--variant NAME=OVERRIDES`` (repeatable) adds a row
``NAME`` run with its own overrides on top of the shared ones (a method with other
hyper-parameters: ``method.name`` in them picks the method, else the config's), in
``<out>/<NAME>/seed<k>``. Then, from the runs' ``summary.json``:

* ``runs.csv``: one row per run (method, seed, status, best and final student metric, final
  teacher metric, steps, training seconds, steps/s, peak memory; with ``--metrics`` or a test
  split, ``final_<role>/<metric>`` and ``test_<role>/<metric>`` columns);
* ``table.md`` / ``table.csv``: per method, mean +- std over seeds of the best and the final
  student metric and the final teacher metric, mean steps/s, max peak memory;
* ``curves.png``: the student's primary metric vs step, one line per method (mean over seeds,
  the band spans min..max over seeds); needs matplotlib (``pip install 'lgtm-ds[plots]'``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .bench_step import free_port
from .plotting import pyplot, save_png

ROOT = Path(__file__).resolve().parents[2]


def _parse(argv):
    ap = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    ap.add_argument("--config", help="experiment YAML (default: the default experiment)")
    ap.add_argument(
        "--methods", default=None, help="comma-separated method names (default: all registered)"
    )
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 added to train.seed")
    ap.add_argument("--out", default="compare", help="folder for the runs and the tables")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=OVERRIDES",
        help='a row of its own: NAME and overrides for it, e.g. "lgtm_x10=--method.name=lgtm '
        '--method.influence_scale=10" (repeatable)',
    )
    ap.add_argument(
        "--metrics",
        default=None,
        help="comma-separated metrics for extra columns (final student / teacher, and test "
        "student / teacher when the data has a test split), e.g. perplexity,gen_f1 "
        "(default: the primary metric)",
    )
    ap.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at a time (this python only; each gets cores / jobs threads); default 1",
    )
    ap.add_argument(
        "--launcher",
        default=None,
        help='command that starts one run, e.g. "deepspeed --num_gpus 8" (default: this python)',
    )
    args, rest = ap.parse_known_args(argv)
    return args, _pairs(rest)


def _pairs(tokens: list[str]) -> list[str]:
    """``--a.b value`` -> ``--a.b=value``, as launch/train.py accepts both."""
    out, i = [], 0
    while i < len(tokens):
        tok = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        if tok.startswith("--") and "=" not in tok and nxt is not None and not nxt.startswith("--"):
            out.append(f"{tok}={nxt}")
            i += 2
        else:
            out.append(tok)
            i += 1
    return out


def _check_overrides(overrides: list[str], where: str, reserved: tuple[str, ...]) -> str | None:
    """The first problem with ``overrides`` (an error line), or None."""
    for o in overrides:
        if not o.startswith("--") or "." not in o.split("=")[0]:
            return f"{where}unexpected argument {o!r} (overrides look like --section.key=value)"
        if o.split("=")[0] in reserved:
            return f"{where}{o.split('=')[0]} is set by compare.py for each run"
    return None


def main(argv: list[str] | None = None) -> int:
    from ..config import load_config
    from ..errors import LGTMError
    from ..methods import method_names

    args, overrides = _parse(sys.argv[1:] if argv is None else argv)
    known = method_names()
    methods = args.methods.split(",") if args.methods else ([] if args.variant else list(known))
    bad = [m for m in methods if m not in known]
    if bad:
        print(f"error: --methods: unknown {bad}; registered: {', '.join(known)}", file=sys.stderr)
        return 2
    if args.seeds < 1:
        print("error: --seeds must be >= 1", file=sys.stderr)
        return 2
    problem = _check_overrides(overrides, "", ("--method.name", "--train.seed", "--output.dir"))
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    flags = [o[2:] for o in overrides]
    try:  # the experiment must load before anything runs (one clear error)
        base = load_config(args.config, flags)
    except LGTMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # rows: (label, method, its own overrides); a --variant's load with its overrides too
    rows_spec = [(m, m, []) for m in methods]
    for v in args.variant:
        name, sep, spec = v.partition("=")
        where = f"--variant {name!r}: "
        if not sep or not name or not all(c.isalnum() or c in "-_." for c in name):
            print(
                f"error: --variant {v!r}: expected NAME=OVERRIDES with NAME of letters, digits, "
                "'-', '_' or '.'",
                file=sys.stderr,
            )
            return 2
        if name in {r[0] for r in rows_spec}:
            print(f"error: {where}the name is taken by another row", file=sys.stderr)
            return 2
        try:
            extra = _pairs(shlex.split(spec))
        except ValueError as e:  # e.g. an unbalanced quote
            print(f"error: {where}cannot split {spec!r}: {e}", file=sys.stderr)
            return 2
        problem = _check_overrides(extra, where, ("--train.seed", "--output.dir"))
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
        try:
            cfg = load_config(args.config, flags + [o[2:] for o in extra])
        except LGTMError as e:
            print(f"error: {where}{e}", file=sys.stderr)
            return 2
        if cfg.train.best_metric != base.train.best_metric:  # one metric ranks every row
            print(
                f"error: {where}train.best_metric differs from the other rows'; give it in the "
                "shared overrides",
                file=sys.stderr,
            )
            return 2
        rows_spec.append((name, cfg.method.name, extra))
    if not rows_spec:
        print("error: nothing to compare (--methods and --variant are empty)", file=sys.stderr)
        return 2
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: --out {args.out!r}: cannot create the folder ({e})", file=sys.stderr)
        return 2
    try:
        launcher = shlex.split(args.launcher) if args.launcher else [sys.executable]
    except ValueError as e:
        print(f"error: --launcher {args.launcher!r}: cannot split it: {e}", file=sys.stderr)
        return 2
    if not launcher or shutil.which(launcher[0]) is None:
        print(f"error: --launcher {args.launcher!r}: no such command", file=sys.stderr)
        return 2
    if args.jobs < 1 or (args.jobs > 1 and args.launcher):
        print(
            f"error: --jobs {args.jobs}: must be >= 1, and 1 with --launcher (each launch "
            "takes the devices and port it is given)",
            file=sys.stderr,
        )
        return 2
    runs, todo = [], []
    for label, method, extra in rows_spec:
        for k in range(args.seeds):
            seed = base.train.seed + k
            run_dir = out / label / f"seed{seed}"
            runs.append((label, seed, run_dir))
            if _status(run_dir) == "completed":
                print(f"{label} seed {seed}: done before ({run_dir})", flush=True)
                continue
            cmd = [
                *launcher,
                str(ROOT / "launch" / "train.py"),
                *(["--config", args.config] if args.config else []),
                *overrides,
                *extra,
                f"--method.name={method}",
                f"--train.seed={seed}",
                f"--output.dir={run_dir}",
                "--output.resume=auto",
            ]
            if _status(run_dir) == "failed":
                cmd.append("--output.overwrite=true")  # a failed run is rerun from scratch
            todo.append((label, seed, run_dir, cmd))
    if not _run_all(todo, args.jobs):
        return 2
    extra_metrics = [m for m in (args.metrics or "").split(",") if m]
    rows = [_row(m, s, d, extra_metrics) for m, s, d in runs]
    table = aggregate(rows, [r[0] for r in rows_spec])
    write_outputs(out, rows, table, runs)
    print((out / "table.md").read_text(), flush=True)
    return 0


def _run_all(todo: list, jobs: int) -> bool:
    """Run ``todo`` (label, seed, folder, command), ``jobs`` at a time; with more than one,
    each run gets ``OMP_NUM_THREADS`` = cores / jobs (unless set) and a free ``MASTER_PORT``.
    False after a run that crashed (not one that failed cleanly): no new run starts, the
    running ones finish, the error names the run's log."""
    env = dict(os.environ)
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    pending, running, crashed = list(todo), [], None
    while pending or running:
        while pending and len(running) < jobs and crashed is None:
            label, seed, run_dir, cmd = pending.pop(0)
            run_dir.mkdir(parents=True, exist_ok=True)
            print(f"{label} seed {seed}: running ({run_dir}/run.log)", flush=True)
            run_env = {**env, "MASTER_PORT": str(free_port())} if jobs > 1 else env
            log = open(run_dir / "run.log", "w")
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, cwd=os.getcwd(), env=run_env
            )
            running.append((label, seed, run_dir, proc, log, time.time()))
        if not running:
            break
        time.sleep(0.2)
        for item in [r for r in running if r[3].poll() is not None]:
            running.remove(item)
            label, seed, run_dir, proc, log, t0 = item
            log.close()
            status = _status(run_dir) or f"exit code {proc.returncode}"
            print(f"{label} seed {seed}: {status} in {time.time() - t0:.0f} s", flush=True)
            if proc.returncode != 0 and status != "failed" and crashed is None:
                crashed = run_dir  # a crash or bad input: stop, say where
    if crashed is not None:
        tail = (crashed / "run.log").read_text().strip().splitlines()[-3:]
        print(
            "error: the run stopped; last lines of its log:\n  " + "\n  ".join(tail),
            file=sys.stderr,
        )
        return False
    return True


def _status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("status", "completed")
    except (OSError, ValueError):
        return None


def _row(method: str, seed: int, run_dir: Path, metrics: list[str] | None = None) -> dict:
    s = json.loads((run_dir / "summary.json").read_text())
    pm = s["primary_metric"]
    final = s.get("final") or {}
    test = s.get("test") or {}
    wall = s.get("wall_s") or 0.0
    # a method that never trains the teacher (student_only): its teacher columns would show the
    # untouched starting model, which reads like a result; leave them empty
    roles = ("student", "teacher") if _trains_teacher(s.get("method")) else ("student",)
    extra = {}
    for m in [pm, *(x for x in metrics or [] if x != pm)] if (test or metrics) else []:
        for where, src in (("final", final), ("test", test)):
            for role in ("student", "teacher"):
                if where == "final" and m == pm:
                    continue  # final_student / final_teacher below
                extra[f"{where}_{role}/{m}"] = src.get(f"{role}/{m}") if role in roles else None
    return {
        "method": method,
        "seed": seed,
        "status": s.get("status", "completed"),
        "primary_metric": pm,
        "lower_is_better": bool(s.get("lower_is_better", False)),
        "best_student": s.get("best_student"),
        "final_student": final.get(f"student/{pm}"),
        "final_teacher": final.get(f"teacher/{pm}") if "teacher" in roles else None,
        "steps": s.get("steps"),
        "train_s": wall,
        "steps_per_s": (s["steps"] + s.get("stage1_steps", 0)) / wall if wall else None,
        "peak_memory_mb": (s.get("peak_memory") or {}).get("mb"),
        "peak_memory_kind": (s.get("peak_memory") or {}).get("kind"),
        **extra,
    }


def _trains_teacher(name: str | None) -> bool:
    """False for a method whose teacher is never trained (neither co-trained nor a stage 1)."""
    from ..methods import METHODS

    if name not in METHODS:  # an older summary or a method this install lacks: show it all
        return True
    cls = METHODS.get(name)
    return cls.trains_teacher or cls.teacher_stage1


def _extra_keys(rows: list[dict]) -> list[str]:
    """The metric columns beyond the primary metric's best/final (``--metrics``, test), in
    order, those some run reports."""
    keys = []
    for r in rows:
        for k in r:
            if "/" in k and k not in keys and any(x.get(k) is not None for x in rows):
                keys.append(k)
    return keys


def _mean_std(values):
    vals = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return mean, std


def aggregate(rows: list[dict], methods: list[str]) -> list[dict]:
    """Per method: mean +- std (sample std over seeds) of the metrics, runs completed."""
    table = []
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        done = [r for r in mine if r["status"] == "completed"]
        entry = {"method": m, "runs": len(mine), "completed": len(done)}
        for key in ("best_student", "final_student", "final_teacher", "steps_per_s"):
            entry[key], entry[key + "_std"] = _mean_std(r[key] for r in done)
        for key in _extra_keys(rows):
            entry[key], entry[key + "_std"] = _mean_std(r.get(key) for r in done)
        mems = [r["peak_memory_mb"] for r in done if r["peak_memory_mb"] is not None]
        entry["peak_memory_mb"] = max(mems) if mems else None
        entry["peak_memory_kind"] = next((r["peak_memory_kind"] for r in done), None)
        table.append(entry)
    return table


def _fmt(mean, std, digits=4, n=2):
    if mean is None:
        return "-"
    if n < 2:  # one run: no spread to show
        return f"{mean:.{digits}f} (n = 1)"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_outputs(out: Path, rows: list[dict], table: list[dict], runs) -> None:
    from ..io import atomic_write_text

    pm = next((r["primary_metric"] for r in rows), "metric")
    lower = next((r["lower_is_better"] for r in rows), False)
    with open(out / "runs.csv.tmp", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    os.replace(out / "runs.csv.tmp", out / "runs.csv")
    with open(out / "table.csv.tmp", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    os.replace(out / "table.csv.tmp", out / "table.csv")
    mem_kind = next((t["peak_memory_kind"] for t in table if t["peak_memory_kind"]), None)
    extra = _extra_keys(rows)
    lines = [
        f"student / teacher {pm} ({'lower' if lower else 'higher'} is better), mean ± std over "
        f"seeds; steps/s: optimizer steps (teacher stage 1 included) per second of the training "
        f"loop, evaluations included; peak memory: "
        + ({"cuda": "max CUDA allocated", "cpu": "peak RSS of the process"}.get(mem_kind, "-")),
        "",
        f"| method | runs | best student {pm} | final student {pm} | final teacher {pm} "
        + "".join(f"| {k.replace('_', ' ', 1)} " for k in extra)
        + "| steps/s | peak memory (MiB) |",
        "|---|---|---|---|---|" + "---|" * len(extra) + "---|---|",
    ]
    for t in table:
        mem = f"{t['peak_memory_mb']:.0f}" if t["peak_memory_mb"] is not None else "-"
        n = t["completed"]
        lines.append(
            f"| {t['method']} | {t['completed']}/{t['runs']} | "
            f"{_fmt(t['best_student'], t['best_student_std'], n=n)} | "
            f"{_fmt(t['final_student'], t['final_student_std'], n=n)} | "
            f"{_fmt(t['final_teacher'], t['final_teacher_std'], n=n)} | "
            + "".join(f"{_fmt(t.get(k), t.get(k + '_std'), n=n)} | " for k in extra)
            + f"{_fmt(t['steps_per_s'], t['steps_per_s_std'], 2, n=n)} | {mem} |"
        )
    atomic_write_text(out / "table.md", "\n".join(lines) + "\n")
    plot_curves(out / "curves.png", runs, pm, lower)


def plot_curves(path: Path, runs, pm: str, lower: bool) -> bool:
    """Student ``pm`` vs step per method: the mean over seeds, the band min..max. False (and a
    note) without matplotlib."""
    plt = pyplot("curves.png")
    if plt is None:
        return False
    curves: dict[str, dict[int, list[float]]] = {}
    for method, _, run_dir in runs:
        s = json.loads((run_dir / "summary.json").read_text())
        for ev in s.get("evaluations", []):
            v = ev.get(f"student/{pm}")
            if isinstance(v, int | float) and math.isfinite(v):
                curves.setdefault(method, {}).setdefault(ev["step"], []).append(v)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for method, by_step in curves.items():
        steps = sorted(by_step)
        mean = [sum(by_step[k]) / len(by_step[k]) for k in steps]
        ax.plot(steps, mean, marker="o", ms=3, label=method)
        ax.fill_between(
            steps, [min(by_step[k]) for k in steps], [max(by_step[k]) for k in steps], alpha=0.2
        )
    ax.set_xlabel("optimizer step (after the teacher's stage 1, if any)")
    ax.set_ylabel(f"student {pm} ({'lower' if lower else 'higher'} is better)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_png(fig, path)
    return True
