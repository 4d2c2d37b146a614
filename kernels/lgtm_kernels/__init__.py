"""LGTM-DS kernels: fused KD loss, chunked fused-linear KD / CE losses, LGTM teacher logit
gradient, fused parameter perturbation.

Imports torch only; triton is imported lazily by the ops that dispatch to it (CUDA tensors, or
``LGTM_KERNELS_BACKEND=triton`` with ``TRITON_INTERPRET=1`` on CPU).
"""

from ._backend import backend_for, triton_available
from .fused_linear import (
    default_chunk_size,
    fused_linear_cross_entropy,
    fused_linear_kd_loss,
    fused_linear_lgtm_teacher_grad,
    fused_linear_logit_grad,
    fused_linear_loss,
)
from .kd_loss import kd_loss, kd_loss_ref, kd_rows_ref
from .lgtm_grad import lgtm_teacher_logit_grad, lgtm_teacher_logit_grad_ref
from .perturb import (
    adamw_lookahead_,
    adamw_lookahead_ref_,
    global_sq_norm,
    global_sq_norm_ref,
    perturb_,
    perturb_ref_,
)

__all__ = [
    "backend_for",
    "triton_available",
    "kd_loss",
    "kd_loss_ref",
    "kd_rows_ref",
    "default_chunk_size",
    "fused_linear_kd_loss",
    "fused_linear_cross_entropy",
    "fused_linear_lgtm_teacher_grad",
    "fused_linear_loss",
    "fused_linear_logit_grad",
    "lgtm_teacher_logit_grad",
    "lgtm_teacher_logit_grad_ref",
    "perturb_",
    "perturb_ref_",
    "global_sq_norm",
    "global_sq_norm_ref",
    "adamw_lookahead_",
    "adamw_lookahead_ref_",
]
