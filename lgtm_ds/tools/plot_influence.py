"""Plots of an LGTM run's distillation influence (``influence.jsonl``, ``metrics.jsonl``).

    python launch/plot_influence.py RUN_DIR [--out DIR] [--examples 12,345] [--trend 64]

Writes into ``RUN_DIR/plots`` (or ``--out``):

- ``influence_examples.png`` (like Fig. 3 of the LGTM paper): for a few examples, the influence
  at every step the example was in a batch, beside the teacher's and the student's gold-label
  probability (decoders: mean token CE) at those steps. ``--examples`` picks them by their
  ``index``; default: the ``--n_examples`` seen most often (ties: largest influence spread).
- ``influence_trends.png`` (like Fig. 4): the influence of ``--trend`` random examples over
  training (thin lines) and the mean over each step's batch (thick).
- ``influence_hist.png``: a histogram of the influence per evaluation interval (the rows
  between two evaluations in ``metrics.jsonl``; its 1st-99th percentile, the tails are
  heavy), at most 12 panels.
- ``influence_ratio.png``: ``influence_ratio`` (the influence term's share of the teacher
  gradient) and the influence scale over training, when the run measured it.

Needs matplotlib (``pip install 'lgtm-ds[plots]'``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from .plotting import pyplot, save_png

INFLUENCE = "influence.jsonl"


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {n} is not JSON ({e.msg})") from e
    return rows


def _stat_keys(rows: list[dict]) -> tuple[str, str] | None:
    """("teacher_<stat>", "student_<stat>") present in the rows, e.g. p_gold."""
    keys = [k for k in rows[0] if k.startswith("teacher_")]
    for k in keys:
        s = "student_" + k.removeprefix("teacher_")
        if s in rows[0]:
            return k, s
    return None


def _finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="plot_influence.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("run_dir", help="an LGTM run folder (output.dir)")
    ap.add_argument("--out", help="folder for the PNGs (default RUN_DIR/plots)")
    ap.add_argument("--examples", help="comma-separated example indices for the Fig. 3 plot")
    ap.add_argument("--n_examples", type=int, default=4, help="examples when --examples is unset")
    ap.add_argument("--trend", type=int, default=64, help="random examples in the trends plot")
    ap.add_argument("--seed", type=int, default=0, help="seeds the random examples")
    args = ap.parse_args(argv)

    run = Path(args.run_dir)
    path = run / INFLUENCE
    if not path.is_file():
        why = "no such folder" if not run.is_dir() else f"no {INFLUENCE} in it"
        print(
            f"error: {run}: {why}; {INFLUENCE} is written by method lgtm runs with "
            f"output.influence_log=true",
            file=sys.stderr,
        )
        return 2
    try:
        rows = [
            r
            for r in _read_jsonl(path)
            if isinstance(r, dict)
            and _finite(r.get("influence"))
            and isinstance(r.get("step"), int)
            and isinstance(r.get("index"), int)
        ]
        metrics = _read_jsonl(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else []
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not rows:
        print(
            f"error: {path} has no rows with a step, an index and a finite influence",
            file=sys.stderr,
        )
        return 2
    wanted = None
    if args.examples:
        try:
            wanted = [int(x) for x in args.examples.split(",")]
        except ValueError:
            print(
                f"error: --examples {args.examples!r}: not comma-separated integers",
                file=sys.stderr,
            )
            return 2
        missing = sorted(set(wanted) - {r["index"] for r in rows})
        if missing:
            print(f"error: --examples: {missing} not in {path}", file=sys.stderr)
            return 2
    plt = pyplot("influence plots")
    if plt is None:
        return 1
    out = Path(args.out) if args.out else run / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = [
        _examples(plt, out / "influence_examples.png", rows, wanted, args.n_examples),
        _trends(plt, out / "influence_trends.png", rows, args.trend, args.seed),
        _histograms(plt, out / "influence_hist.png", rows, metrics),
        _ratio(plt, out / "influence_ratio.png", metrics),
    ]
    for p in written:
        if p is not None:
            print(p)
    return 0


def _by_example(rows: list[dict]) -> dict[int, list[dict]]:
    by = defaultdict(list)
    for r in rows:
        by[r["index"]].append(r)
    return by


def _examples(plt, path: Path, rows, wanted, n: int) -> Path:
    by = _by_example(rows)
    if wanted is None:

        def rank(i):
            v = [r["influence"] for r in by[i]]
            return (len(v), float(np.ptp(v)))

        wanted = sorted(by, key=rank, reverse=True)[: max(1, n)]
    stats = _stat_keys(rows)
    fig, axes = plt.subplots(
        len(wanted), 2, figsize=(10, 2.4 * len(wanted)), dpi=110, squeeze=False
    )
    for (ax_i, ax_s), idx in zip(axes, wanted):
        rs = sorted(by[idx], key=lambda r: r["step"])
        steps = [r["step"] for r in rs]
        ax_i.plot(steps, [r["influence"] for r in rs], marker="o", ms=3, color="tab:purple")
        ax_i.axhline(0, color="grey", lw=0.8)
        ax_i.set_ylabel("influence")
        ax_i.set_title(f"example {idx}", fontsize=9, loc="left")
        if stats is not None:
            for key, color in zip(stats, ("tab:blue", "tab:orange")):
                ys = [r.get(key) if _finite(r.get(key)) else np.nan for r in rs]
                ax_s.plot(steps, ys, marker="o", ms=3, color=color, label=key)
            ax_s.set_ylabel(stats[0].removeprefix("teacher_"))
            ax_s.legend(fontsize=8)
        for ax in (ax_i, ax_s):
            ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("optimizer step")
    fig.tight_layout()
    save_png(fig, path)
    return path


def _trends(plt, path: Path, rows, n: int, seed: int) -> Path:
    by = _by_example(rows)
    ids = sorted(by)
    rng = np.random.default_rng(seed)
    pick = rng.choice(ids, min(n, len(ids)), replace=False) if ids else []
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for idx in pick:
        rs = sorted(by[int(idx)], key=lambda r: r["step"])
        ax.plot([r["step"] for r in rs], [r["influence"] for r in rs], lw=0.8, alpha=0.5)
    per_step = defaultdict(list)
    for r in rows:
        per_step[r["step"]].append(r["influence"])
    steps = sorted(per_step)
    ax.plot(
        steps,
        [np.mean(per_step[s]) for s in steps],
        color="black",
        lw=2,
        label="mean over the batch",
    )
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("distillation influence")
    ax.set_title(f"{len(pick)} random examples", fontsize=9, loc="left")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
    return path


def _histograms(plt, path: Path, rows, metrics) -> Path:
    evals = sorted({int(m["step"]) for m in metrics if m.get("eval") and m.get("stage") != 1})
    last = max(r["step"] for r in rows)
    edges = [e for e in evals if e > 0] or [last]
    if edges[-1] < last:
        edges.append(last)
    windows, lo = [], 0
    for hi in edges:
        vals = [r["influence"] for r in rows if lo < r["step"] <= hi]
        if vals:
            windows.append((lo, hi, vals))
        lo = hi
    if len(windows) > 12:  # evenly spaced, the last one included
        keep = np.linspace(0, len(windows) - 1, 12).round().astype(int)
        windows = [windows[i] for i in sorted(set(keep))]
    cols = min(4, len(windows))
    nrows = math.ceil(len(windows) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.6 * nrows), dpi=110, squeeze=False)
    for ax, (a, b, vals) in zip(axes.flat, windows):
        lo_hi = np.percentile(vals, [1, 99])  # heavy tails: the central 98% is the picture
        if lo_hi[0] < lo_hi[1]:
            ax.hist(vals, bins=40, range=tuple(lo_hi), color="tab:purple", alpha=0.8)
        else:
            ax.hist(vals, bins=40, color="tab:purple", alpha=0.8)
        ax.axvline(0, color="grey", lw=0.8)
        neg = sum(v < 0 for v in vals) / len(vals)
        ax.set_title(f"steps {a + 1}-{b}: {neg:.0%} negative", fontsize=8)
    for ax in list(axes.flat)[len(windows) :]:
        ax.axis("off")
    fig.supxlabel("distillation influence (1st-99th percentile of each interval)")
    fig.tight_layout()
    save_png(fig, path)
    return path


def _ratio(plt, path: Path, metrics) -> Path | None:
    pts = [
        (m["step"], m["influence_ratio"], m.get("influence_scale"))
        for m in metrics
        if _finite(m.get("influence_ratio")) and m["influence_ratio"] > 0
    ]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(8, 3.8), dpi=110)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label="influence_ratio")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("|eta grad h| / |grad L_t|")
    ax.grid(alpha=0.3)
    scales = [p[2] for p in pts]
    if all(_finite(s) for s in scales) and len(set(scales)) > 1:
        ax2 = ax.twinx()
        ax2.plot([p[0] for p in pts], scales, color="tab:green", lw=1, label="influence_scale")
        ax2.set_ylabel("influence_scale", color="tab:green")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    save_png(fig, path)
    return path
