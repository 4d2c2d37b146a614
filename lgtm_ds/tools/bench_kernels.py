"""Benchmark lgtm_kernels against torch eager, torch.compile and Liger-Kernel on one CUDA card.

    python launch/bench_kernels.py [--check] [--quick] [--out benchmarks/kernels.csv]

Cases (all in one run, one card): KD loss forward + backward w.r.t. the student logits (bf16,
N = 8192 rows, V in {32000, 128256, 151936}, T = 2); parameter perturbation p += a v and the
global squared norm over a Llama-3.2-1B-shaped list (HF layout, tied embeddings: 146 tensors,
1.236 B parameters) and over one flat buffer, bf16 params with bf16 and fp32 directions.
Reports the median of triton.testing.do_bench, effective GB/s of the minimal traffic, "x floor"
(time / (minimal bytes / device-to-device copy rate measured in this run)) and the peak memory
beyond the inputs; appends one CSV row per measurement, prints a table last. Every measurement
is guarded: an error (OOM included) is recorded in the row's note and the run goes on.

Entry point: ``launch/bench_kernels.py`` (or ``python -m lgtm_ds.tools.bench_kernels``). Imports
nothing from ``lgtm_ds``; torch, triton, Liger and ``lgtm_kernels`` are imported inside the
functions that use them.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository root (lgtm_ds/tools/ -> ../..)
# Smoke-test of this script's logic on a CPU (torch backend, tiny sizes, wall-clock timer, no
# memory stats): LGTM_BENCH_DRYRUN=1 python launch/bench_kernels.py --quick --out /tmp/x.csv
DRYRUN = os.environ.get("LGTM_BENCH_DRYRUN") == "1"
DEV = "cpu" if DRYRUN else "cuda"


def _import_kernels():
    try:
        import lgtm_kernels  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(ROOT / "kernels"))
    import lgtm_kernels

    return lgtm_kernels


# ------------------------------------------------------------------------------ measurement
class Bench:
    def __init__(self, out: Path, quick: bool):
        import torch

        self.torch = torch
        self.out = out
        self.quick = quick
        self.rows: list[dict] = []
        self.gpu = torch.cuda.get_device_name(0) if not DRYRUN else "cpu-dryrun"
        self.commit = _git_commit()
        self.date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.copy_gbps = None
        self.copy_gbps = self._copy_rate()
        print(
            f"# {self.gpu}  commit {self.commit}  copy rate {self.copy_gbps:.0f} GB/s "
            f"(bytes read + written)",
            flush=True,
        )

    def _copy_rate(self) -> float:
        n = (1 << 28) if not self.quick else (1 << 26)  # 512 MiB / 128 MiB of bf16
        if DRYRUN:
            n = 1 << 20
        src = self.torch.empty(n, dtype=self.torch.bfloat16, device=DEV).normal_()
        dst = self.torch.empty_like(src)
        ms = _do_bench(lambda: dst.copy_(src), warmup=50, rep=200)
        self.record("torch copy_", f"d2d copy {n * 2 >> 20} MiB", ms, 4 * n, 0.0)
        return 4 * n / (ms * 1e-3) / 1e9  # bytes read + written

    def record(self, impl, case, ms, floor_bytes, extra_mib, note=""):
        gbps = floor_bytes / (ms * 1e-3) / 1e9 if ms else None
        x_floor = None
        if ms and getattr(self, "copy_gbps", None):
            x_floor = ms / (floor_bytes / (self.copy_gbps * 1e9) * 1e3)
        row = dict(
            gpu=self.gpu,
            commit=self.commit,
            date=self.date,
            impl=impl,
            case=case,
            ms=ms,
            gbps=gbps,
            x_floor=x_floor,
            extra_mib=extra_mib,
            note=note,
        )
        self.rows.append(row)
        new = not self.out.exists() or self.out.stat().st_size == 0
        with self.out.open("a") as f:
            if new:
                f.write("gpu,commit,date,impl,case,ms,gbps,x_floor,extra_mib,note\n")
            vals = [
                _fmt(row[k])
                for k in (
                    "gpu",
                    "commit",
                    "date",
                    "impl",
                    "case",
                    "ms",
                    "gbps",
                    "x_floor",
                    "extra_mib",
                    "note",
                )
            ]
            f.write(",".join(vals) + "\n")
        if ms:
            xf = f"x{x_floor:6.2f}" if x_floor is not None else "x   n/a"
            print(
                f"{impl:34s} {case:38s} {ms:9.3f} ms {gbps:8.0f} GB/s {xf} "
                f"extra {extra_mib or 0.0:9.1f} MiB",
                flush=True,
            )
        else:
            print(f"{impl:34s} {case:38s} ERROR {note}", flush=True)

    def measure(self, impl, case, fn, floor_bytes, grad_to_none=None):
        """Median ms of fn (do_bench), and peak memory of one call beyond what is allocated."""
        torch = self.torch
        try:
            extra = 0.0
            if DRYRUN:
                fn()
            else:
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                fn()  # warm-up / compile, and the memory probe
                torch.cuda.synchronize()
                extra = (torch.cuda.max_memory_allocated() - base) / 2**20
            if grad_to_none:
                for t in grad_to_none:
                    t.grad = None
            ms = _do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none)
            self.record(impl, case, ms, floor_bytes, extra)
        except Exception as e:  # noqa: BLE001 - OOM and anything else: record and go on
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
            self.record(impl, case, None, floor_bytes, None, note=msg)
        finally:
            if grad_to_none:
                for t in grad_to_none:
                    t.grad = None
            if not DRYRUN:
                torch.cuda.empty_cache()

    def table(self):
        print("\n| impl | case | ms | GB/s | x floor | extra MiB | note |")
        print("|---|---|---|---|---|---|---|")
        for r in self.rows:
            print(
                "| "
                + " | ".join(
                    _fmt(r[k], md=True)
                    for k in ("impl", "case", "ms", "gbps", "x_floor", "extra_mib", "note")
                )
                + " |"
            )
        print(
            f"\n{self.gpu}, commit {self.commit}, copy rate {self.copy_gbps:.0f} GB/s; rows "
            f"appended to {self.out}"
        )


def _do_bench(fn, warmup, rep, grad_to_none=None) -> float:
    """Median ms: triton.testing.do_bench on CUDA, a wall-clock loop in the CPU dry run."""
    if not DRYRUN:
        from triton.testing import do_bench

        return do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median")
    times = []
    for _ in range(3):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]


def _fmt(v, md=False):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if not md else (f"{v:.3f}" if v < 100 else f"{v:.0f}")
    s = str(v)
    return s.replace(",", ";").replace("\n", " ") if not md else s.replace("|", "/")


def _git_commit() -> str:
    try:
        return (
            subprocess.run(
                ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            or "?"
        )
    except Exception:  # noqa: BLE001
        return "?"


# ------------------------------------------------------------------------------ KD loss
def bench_kd(b: Bench, K):
    import torch
    import torch.nn.functional as F

    T = 2.0
    N = 8192 if not b.quick else 1024
    vocabs = (32000, 128256, 151936) if not b.quick else (32000, 128256)
    if DRYRUN:
        N, vocabs = 16, (1000, 3000)

    def eager_ref(s, t):  # reference formula, fp32: log_softmax both, sum p (log p - log q)
        lq = torch.log_softmax(s.float() / T, -1)
        lp = torch.log_softmax(t.float() / T, -1)
        return (lp.exp() * (lp - lq)).sum() / s.shape[0]

    def eager_kldiv(s, t):
        lq = F.log_softmax(s.float() / T, -1)
        lp = F.log_softmax(t.float() / T, -1)
        return F.kl_div(lq, lp, reduction="batchmean", log_target=True)

    compiled = torch.compile(eager_kldiv) if not DRYRUN else eager_kldiv
    impls = [
        ("ours kd_loss", lambda s, t: K.kd_loss(s, t, temperature=T)),
        (
            "ours kd_loss reverse_kl",
            lambda s, t: K.kd_loss(s, t, temperature=T, divergence="reverse_kl"),
        ),
        ("ours kd_loss jsd(0.5)", lambda s, t: K.kd_loss(s, t, temperature=T, divergence="jsd")),
        ("eager reference formula", eager_ref),
        ("eager F.kl_div(log_target)", eager_kldiv),
        ("torch.compile F.kl_div", compiled),
    ]
    # Liger on log_softmax inputs (fp32), each constructed under its own guard: old releases
    # reject LigerJSD(beta=0), which is forward KL in current ones (as in TRL)
    try:
        from liger_kernel.transformers import LigerKLDIVLoss

        kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
        impls.append(
            (
                "liger LigerKLDIVLoss",
                lambda s, t: kl(F.log_softmax(s.float() / T, -1), F.log_softmax(t.float() / T, -1)),
            )
        )
    except Exception as e:  # noqa: BLE001
        print(f"# Liger LigerKLDIVLoss unavailable ({type(e).__name__}: {e}): skipped", flush=True)
    try:
        from liger_kernel.transformers import LigerJSD

        jsd = LigerJSD(beta=0.0)
        impls.append(
            (
                "liger LigerJSD(beta=0)",
                lambda s, t: jsd(
                    F.log_softmax(s.float() / T, -1), F.log_softmax(t.float() / T, -1)
                ),
            )
        )
    except Exception as e:  # noqa: BLE001
        print(
            f"# Liger LigerJSD(beta=0) unavailable ({type(e).__name__}: {e}): skipped", flush=True
        )

    def tuned(max_fused=None, loop_block=None):
        """kd_loss with the Triton block-size knobs changed for the call (tuning rows)."""
        from lgtm_kernels import _kd_triton as kt

        def f(s, t):
            old = (kt.MAX_FUSED_V, kt.LOOP_BLOCK)
            kt.MAX_FUSED_V = max_fused or old[0]
            kt.LOOP_BLOCK = loop_block or old[1]
            try:
                return K.kd_loss(s, t, temperature=T)
            finally:
                kt.MAX_FUSED_V, kt.LOOP_BLOCK = old

        return f

    for V in vocabs:
        case = f"kd fwd+bwd bf16 N={N} V={V} T=2"
        extra_impls = [
            ("tune: ours loop block 8192", tuned(max_fused=1, loop_block=8192)),
            ("tune: ours loop block 2048", tuned(max_fused=1, loop_block=2048)),
        ]
        if V <= 32768:  # the whole row in registers (spills on sm_90: measure the cost)
            extra_impls.append(("tune: ours single block 32768", tuned(max_fused=32768)))
        floor = 6 * N * V  # read s, read t, write the bf16 gradient
        try:
            s = (torch.randn(N, V, device=DEV) * 3).bfloat16().requires_grad_(True)
            t = (torch.randn(N, V, device=DEV) * 3).bfloat16()
        except Exception as e:  # noqa: BLE001
            b.record("inputs", case, None, floor, None, note=f"{type(e).__name__}: {e}"[:200])
            continue
        for name, f in impls + extra_impls:

            def step(f=f, s=s, t=t):
                f(s, t).backward()

            b.measure(name, case, step, floor, grad_to_none=[s])
        del s, t
        if not DRYRUN:
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------ perturbation
def llama_1b_shapes(n_layers=16, vocab=128256, hidden=2048, inter=8192, kv=512):
    """Llama-3.2-1B parameter list in HF order, tied embeddings: 146 tensors, 1,235,814,400."""
    shapes = [(vocab, hidden)]
    for _ in range(n_layers):
        shapes += [
            (hidden, hidden),
            (kv, hidden),
            (kv, hidden),
            (hidden, hidden),
            (inter, hidden),
            (inter, hidden),
            (hidden, inter),
            (hidden,),
            (hidden,),
        ]
    shapes.append((hidden,))
    return shapes


def bench_perturb(b: Bench, K):
    import torch

    shapes = llama_1b_shapes(n_layers=16 if not b.quick else 2)
    if DRYRUN:
        shapes = llama_1b_shapes(n_layers=2, vocab=1000, hidden=64, inter=256, kv=16)
    numel = sum(int(torch.Size(s).numel()) for s in shapes)
    print(f"# perturbation list: {len(shapes)} tensors, {numel / 1e9:.3f} B parameters", flush=True)
    alpha = torch.tensor(1e-3, device=DEV)
    for vdt, vname in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        try:
            params = [torch.randn(s, device=DEV).bfloat16() for s in shapes]
            dirs = [torch.randn(s, device=DEV).to(vdt) for s in shapes]
        except Exception as e:  # noqa: BLE001
            b.record("inputs", f"perturb v={vname}", None, 1, None, note=f"{e}"[:200])
            continue
        vb = 2 if vdt == torch.bfloat16 else 4
        _bench_list(b, K, params, dirs, alpha, vb, vname)
        del params
        try:  # one flat buffer
            flat = torch.randn(numel, device=DEV).bfloat16()
            vflat = torch.cat([d.reshape(-1) for d in dirs])
            del dirs
            _bench_flat(b, K, flat, vflat, alpha, vb, vname)
            del flat, vflat
        except Exception as e:  # noqa: BLE001
            b.record("inputs", f"perturb flat v={vname}", None, 1, None, note=f"{e}"[:200])
        if not DRYRUN:
            torch.cuda.empty_cache()


def _bench_list(b: Bench, K, params, dirs, alpha, vb: int, vname: str) -> None:
    import torch

    numel = sum(p.numel() for p in params)
    case = f"perturb list {len(params)}t p=bf16 v={vname}"
    floor = numel * (2 + vb + 2)  # read p, read v, write p
    b.measure("ours perturb_", case, lambda: K.perturb_(params, dirs, alpha), floor)
    b.measure(
        "python loop add_",
        case,
        lambda: [p.add_(v, alpha=1e-3) for p, v in zip(params, dirs, strict=True)],
        floor,
    )
    b.measure(
        "torch._foreach_add_", case, lambda: torch._foreach_add_(params, dirs, alpha=1e-3), floor
    )
    ncase = f"sq-norm list {len(params)}t v={vname}"
    b.measure("ours global_sq_norm", ncase, lambda: K.global_sq_norm(dirs), numel * vb)
    b.measure(
        "torch._foreach_norm",
        ncase,
        lambda: torch.stack(torch._foreach_norm(dirs)).square().sum(),
        numel * vb,
    )
    # the whole LGTM perturbation: norm of v, then p = p + (r / ||v||) v, no host sync
    b.measure(
        "ours norm + perturb_",
        f"norm+perturb list {len(params)}t v={vname}",
        lambda: K.perturb_(params, dirs, 1e-2 * K.global_sq_norm(dirs).rsqrt()),
        numel * (2 + 2 * vb + 2),
    )


def _bench_flat(b: Bench, K, flat, vflat, alpha, vb: int, vname: str) -> None:
    import torch

    numel = flat.numel()
    case = f"perturb flat p=bf16 v={vname}"
    floor = numel * (2 + vb + 2)
    b.measure("ours perturb_ (flat)", case, lambda: K.perturb_([flat], [vflat], alpha), floor)
    b.measure("flat add_", case, lambda: flat.add_(vflat, alpha=1e-3), floor)
    ncase = f"sq-norm flat v={vname}"
    b.measure("ours global_sq_norm (flat)", ncase, lambda: K.global_sq_norm(vflat), numel * vb)
    b.measure(
        "torch.linalg.vector_norm (flat)",
        ncase,
        lambda: torch.linalg.vector_norm(vflat, dtype=torch.float32).square(),
        numel * vb,
    )


def run_checks() -> int:
    """Correctness at full size on this GPU before any timing."""
    env = dict(os.environ, LGTM_KERNELS_BACKEND="")
    env["PYTHONPATH"] = str(ROOT / "kernels") + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-m",
        "gpu",
        "-p",
        "no:cacheprovider",
        str(ROOT / "tests" / "kernels"),
    ]
    print("# " + " ".join(cmd), flush=True)
    t0 = time.time()
    rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    print(f"# checks: exit {rc} in {time.time() - t0:.0f} s", flush=True)
    return rc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="lgtm_kernels benchmark (one CUDA card)")
    ap.add_argument("--quick", action="store_true", help="smaller sizes: a smoke check")
    ap.add_argument("--check", action="store_true", help="run the full-size GPU tests first")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "kernels.csv")
    ap.add_argument("--only", choices=["kd", "perturb"], default=None)
    args = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("bench_kernels: torch is not installed")
        return 1
    if not torch.cuda.is_available() and not DRYRUN:
        print("bench_kernels: no CUDA device found; this benchmark needs one GPU (nothing run)")
        return 1
    try:
        import triton  # noqa: F401
    except ImportError:
        print("bench_kernels: triton is not installed")
        return 1
    if not DRYRUN:  # the dry run may force the Triton interpreter to exercise the kernels
        os.environ.pop("LGTM_KERNELS_BACKEND", None)
        os.environ.pop("TRITON_INTERPRET", None)
    K = _import_kernels()
    check_rc = run_checks() if args.check else None
    b = Bench(args.out, args.quick)
    if args.only in (None, "kd"):
        bench_kd(b, K)
    if args.only in (None, "perturb"):
        bench_perturb(b, K)
    b.table()
    if check_rc is not None:
        print(
            f"\ncorrectness checks (pytest -m gpu tests/kernel_ops): "
            f"{'PASSED' if check_rc == 0 else f'FAILED (exit {check_rc})'}"
        )
    return 0 if not check_rc else 1


if __name__ == "__main__":
    sys.exit(main())
