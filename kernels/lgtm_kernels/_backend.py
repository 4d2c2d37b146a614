"""Backend selection shared by every op: Triton on CUDA tensors, the torch reference elsewhere.

``LGTM_KERNELS_BACKEND=triton|torch`` (read at every call) overrides the choice; an explicit
``choice`` (``kd_loss(backend=...)``, ``kd_loss_ref``) overrides the variable. Nothing in the
package writes the environment. Forcing
``triton`` on CPU tensors needs ``TRITON_INTERPRET=1`` in the environment before triton is first
imported (the interpreter runs the same kernels serially on the host, ~100x slower than torch).
Triton is imported lazily, so ``import lgtm_kernels`` works on a machine without it.
"""

from __future__ import annotations

import functools
import os

import torch

_ENV = "LGTM_KERNELS_BACKEND"


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether triton imports (tried once, on the first op that could use it)."""
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - absent or broken: use the torch path
        return False
    return True


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_for(*tensors: torch.Tensor, choice: str | None = None) -> str:
    """Return "triton" or "torch" for an op whose operands are ``tensors``.

    ``choice`` ("triton", "torch" or "auto") takes the place of ``LGTM_KERNELS_BACKEND`` for
    this call (the ``*_ref`` entry points pass "torch"); None reads the variable."""
    src = _ENV if choice is None else "backend"
    if choice is None:
        choice = os.environ.get(_ENV, "")
    choice = choice.strip().lower()
    if choice not in ("", "auto", "triton", "torch"):
        raise ValueError(f"{src} must be 'triton', 'torch' or unset, got {choice!r}")
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if choice == "torch":
        return "torch"
    if choice == "triton":
        if not triton_available():
            raise RuntimeError(f"{src}=triton but triton is not installed")
        if not on_cuda and not interpreter_on():
            raise RuntimeError(
                f"{src}=triton on CPU tensors needs TRITON_INTERPRET=1 (set before triton "
                "is imported)"
            )
        return "triton"
    if on_cuda and triton_available():
        return "triton"
    return "torch"
