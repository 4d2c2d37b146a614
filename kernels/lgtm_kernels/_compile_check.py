"""Compile every kernel configuration the launchers use for a CUDA target *without a GPU* and
report registers and stack (spill) bytes per thread (from the cubin, with cuobjdump) and the
number of vectorised (128/64-bit) global accesses in the PTX.

    TRITON_INTERPRET=0 python -m lgtm_kernels._compile_check [--arch 90]

Catches what the interpreter cannot (type errors in compiled code, register spills). Exits 1
if a configuration fails to compile.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile


def _configs():
    from . import _kd_triton as kd
    from . import _lgtm_grad_triton as lg
    from . import _multi_tensor_triton as mt

    kd_sig = {
        "s_ptr": "*bf16",
        "t_ptr": "*bf16",
        "g_ptr": "*bf16",
        "loss_ptr": "*fp32",
        "w_ptr": "*fp32",
        "m_ptr": "*u8",
        "gscale_ptr": "*fp32",
        "s_stride": "i64",
        "t_stride": "i64",
        "g_stride": "i64",
        "V": "i32",
        "inv_T": "fp32",
        "beta": "fp32",
        "lscale": "fp32",
    }
    for dt in ("bf16", "fp32"):
        for div in (0, 1, 2):
            for single in (True, False):
                block = kd.MAX_FUSED_V if single else kd.LOOP_BLOCK
                sig = {
                    k: (f"*{dt}" if k in ("s_ptr", "t_ptr", "g_ptr") else v)
                    for k, v in kd_sig.items()
                }
                yield (
                    f"kd {dt} div={div} single={single} block={block}",
                    kd._kd_fwd_kernel,
                    sig,
                    dict(
                        DIV=div,
                        HAS_W=True,
                        HAS_MASK=True,
                        COMPUTE_GRAD=True,
                        SINGLE=single,
                        BLOCK=block,
                    ),
                    kd._warps(block),
                )
    lg_sig = {
        "z_ptr": "*bf16",
        "s_ptr": "*bf16",
        "sp_ptr": "*bf16",
        "sm_ptr": "*bf16",
        "y_ptr": "*i64",
        "g_ptr": "*bf16",
        "inf_ptr": "*fp32",
        "coef_ptr": "*fp32",
        "z_stride": "i64",
        "s_stride": "i64",
        "sp_stride": "i64",
        "sm_stride": "i64",
        "V": "i32",
        "inv_T": "fp32",
    }
    for single in (True, False):
        block = lg.MAX_FUSED_V if single else lg.LOOP_BLOCK
        yield (
            f"lgtm_grad bf16 single={single} block={block}",
            lg._lgtm_grad_kernel,
            lg_sig,
            dict(SINGLE=single, BLOCK=block),
            lg._warps(block),
        )
    for pd, vd in (("bf16", "bf16"), ("bf16", "fp32"), ("fp32", "fp32")):
        for aligned in (True, False):
            sig = {
                "p_tab": "*i64",
                "v_tab": "*i64",
                "s_tab": "*i64",
                "numel_ptr": "*i64",
                "bstart_ptr": "*i64",
                "alpha_ptr": "*fp32",
                "alpha_val": "fp32",
                "p_w": f"*{pd}",
                "v_w": f"*{vd}",
                "s_w": "*fp32",
                "N_T": "i32",
            }
            yield (
                f"perturb p={pd} v={vd} src aligned={aligned}",
                mt._perturb_kernel,
                sig,
                dict(HAS_SRC=True, ALPHA_PTR=True, ALIGNED=aligned, LOG_T=8, BLOCK=mt.BLOCK),
                mt.NUM_WARPS,
            )
    sig = {
        "x_tab": "*i64",
        "numel_ptr": "*i64",
        "bstart_ptr": "*i64",
        "out_ptr": "*fp32",
        "x_w": "*bf16",
        "N_T": "i32",
    }
    yield (
        "sq_norm bf16",
        mt._sq_norm_kernel,
        sig,
        dict(ALIGNED=True, LOG_T=8, BLOCK=mt.BLOCK),
        mt.NUM_WARPS,
    )
    sig = {
        "p_tab": "*i64",
        "g_tab": "*i64",
        "m_tab": "*i64",
        "v_tab": "*i64",
        "s_tab": "*i64",
        "numel_ptr": "*i64",
        "bstart_ptr": "*i64",
        "p_w": "*bf16",
        "g_w": "*bf16",
        "m_w": "*fp32",
        "v_w": "*fp32",
        "s_w": "*fp32",
        "N_T": "i32",
        "decay": "fp32",
        "beta1": "fp32",
        "beta2": "fp32",
        "step_size": "fp32",
        "bc2_sqrt": "fp32",
        "eps": "fp32",
    }
    yield (
        "adamw_lookahead bf16/fp32",
        mt._adamw_lookahead_kernel,
        sig,
        dict(HAS_SRC=True, ALIGNED=True, LOG_T=8, BLOCK=mt.BLOCK),
        mt.NUM_WARPS,
    )


def _resources(cubin: bytes) -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return "?"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if "REG:" in line:
            parts = dict(p.split(":", 1) for p in line.split() if ":" in p)
            return f"regs={parts.get('REG')} stack={parts.get('STACK')}B"
    return "?"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter replaces @triton.jit functions")
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", args.arch, 32)
    bad = 0
    for name, fn, sig, consts, nw in _configs():
        # what the runtime specialises for 16-divisible values: pointers (allocations), strides
        # and V (32000, 128256, 151936 are multiples of 16)
        attrs = {
            (i,): [["tt.divisibility", 16]]
            for i, k in enumerate(sig)
            if sig[k].startswith("*") or k.endswith("stride") or k == "V"
        }
        sig = dict(sig, **{k: "constexpr" for k in consts})
        try:
            src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
            c = triton.compile(src, target=target, options={"num_warps": nw})
            ptx = c.asm["ptx"]
            vec = len(re.findall(r"(?:ld|st)\.global\.v[24]", ptx))
            print(f"ok   {name:48s} warps={nw:2d} {_resources(c.asm['cubin'])} vector_ld_st={vec}")
        except Exception as e:  # report every failure, then exit 1
            bad += 1
            print(f"FAIL {name}: {type(e).__name__}: {str(e)[:1500]}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
