"""LGTM teacher logit gradient and per-sample distillation influence (docs/algorithm.md,
Eq. (8)-(9)).

    dL/dz = a_t (softmax(z/T) - q) / (T n) + (1 - a_t) (softmax(z) - onehot(y)) / n
            + eta a_t (q+ - q-) / (2 R T n)
    I_i   = -eta (l_i(+) - l_i(-)) / (2 R),  l_i(+-) = KL(softmax(z_i/T) || q+-_i)

with q = softmax(student/T) and q+- = softmax(student_plus/minus / T). Rows with label < 0 (the
-100 ignore index) get no CE term. -inf logits are supported where *all four* inputs are -inf at
the same position (masked vocabulary); other -inf patterns are not.
"""

from __future__ import annotations

import torch

from ._backend import backend_for


def _coefs(alpha_teacher, temperature, eta, radius, n, device):
    """[a_t/(T n), (1 - a_t)/n, eta a_t/(2 R T n), -eta/(2 R)] as a device fp32 tensor;
    ``radius`` may be a device tensor (r / ||v||), so no host sync is needed."""
    R = radius if isinstance(radius, torch.Tensor) else torch.tensor(float(radius))
    R = R.to(device=device, dtype=torch.float32).reshape(())
    a, T = float(alpha_teacher), float(temperature)
    c = torch.stack(
        [
            torch.full((), a / (T * n), device=device),
            torch.full((), (1.0 - a) / n, device=device),
            (eta * a / (2.0 * T * n)) / R,
            (-eta / 2.0) / R,
        ]
    )
    return c.to(torch.float32)


def lgtm_teacher_logit_grad_ref(
    z, s, sp, sm, labels, *, alpha_teacher, temperature, eta, radius, n_rows=None
):
    """Pure torch (math in fp32, or float64 for float64 inputs). Traffic: ~12 fp32 N x V
    temporaries (log-softmaxes, probabilities, the sum), then one cast into z's dtype."""
    V = z.shape[-1]
    ct = torch.float64 if z.dtype == torch.float64 else torch.float32
    z, s, sp, sm = (x.reshape(-1, V).to(ct) for x in (z, s, sp, sm))
    y = labels.reshape(-1).to(z.device)
    n = n_rows if n_rows is not None else z.shape[0]
    T, a = float(temperature), float(alpha_teacher)
    R = radius.to(ct) if isinstance(radius, torch.Tensor) else float(radius)
    lpt = torch.log_softmax(z / T, -1)
    pt = lpt.exp()
    p1 = torch.softmax(z, -1)
    q = torch.softmax(s / T, -1)
    lqp = torch.log_softmax(sp / T, -1)
    lqm = torch.log_softmax(sm / T, -1)
    onehot = torch.zeros_like(z)
    valid = y >= 0
    onehot[valid] = torch.nn.functional.one_hot(y[valid], V).to(ct)
    ce = (p1 - onehot) * valid[:, None].to(ct)
    g = (
        a * (pt - q) / (T * n)
        + (1 - a) * ce / n
        + eta * a * (lqp.exp() - lqm.exp()) / (2 * R * T * n)
    )
    diff = torch.where(z == float("-inf"), 0.0, pt * (lqm - lqp)).sum(-1)
    infl = -eta * diff / (2 * R)
    return g, infl.to(torch.float32) if ct == torch.float32 else infl


def lgtm_teacher_logit_grad_torch(
    z, s, sp, sm, labels, *, alpha_teacher, temperature, eta, radius, n_rows=None
):
    """The torch path (CPU, float64, and CUDA without Triton): the reference's math with
    in-place updates, ~5 ``N x V`` temporaries instead of ~12, one softmax shared by the KD and
    CE terms at ``T = 1``, the CE's one-hot as an indexed subtraction. Returns (dL/dz in the
    compute dtype, influence), as the reference."""
    V = z.shape[-1]
    ct = torch.float64 if z.dtype == torch.float64 else torch.float32
    z, s, sp, sm = (x.reshape(-1, V) for x in (z, s, sp, sm))
    y = labels.reshape(-1).to(z.device)
    n = n_rows if n_rows is not None else z.shape[0]
    T, a = float(temperature), float(alpha_teacher)
    R = float(radius)  # note: host sync for a device radius (the Triton path takes it as is)

    def scaled(x):  # x / T in the compute dtype, a new tensor (the inputs stay untouched)
        return x.to(ct) / T if T != 1.0 else x.to(ct, copy=True)

    pt = torch.softmax(scaled(z), -1)
    g = pt * (a / (T * n))
    g.sub_(torch.softmax(scaled(s), -1), alpha=a / (T * n))
    if a != 1.0:
        p1 = pt if T == 1.0 else torch.softmax(z.to(ct), -1)
        valid = (y >= 0).to(ct)[:, None]  # ignored rows: no CE term
        g.addcmul_(p1, valid, value=(1.0 - a) / n)
        rows = (y >= 0).nonzero().squeeze(-1)
        sub = torch.full(rows.shape, -(1.0 - a) / n, dtype=ct, device=g.device)
        g.index_put_((rows, y[rows]), sub, accumulate=True)
    lqp = torch.log_softmax(scaled(sp), -1)
    lqm = torch.log_softmax(scaled(sm), -1)
    c = eta * a / (2.0 * R * T * n)
    g.add_(lqp.exp(), alpha=c)
    g.sub_(lqm.exp(), alpha=c)
    diff = lqm.sub_(lqp).mul_(pt)
    diff.masked_fill_(torch.isneginf(z), 0.0)  # masked vocabulary: -inf - -inf = nan, times 0
    infl = -eta * diff.sum(-1) / (2.0 * R)
    return g, infl


@torch.no_grad()
def lgtm_teacher_logit_grad(
    teacher_logits,
    student_logits,
    student_logits_plus,
    student_logits_minus,
    labels,
    *,
    alpha_teacher: float,
    temperature: float,
    eta: float,
    radius,
    n_rows: int | None = None,
):
    """Returns (dL/dz in teacher_logits' dtype and shape, per-row influence fp32 [rows]).

    Feed the gradient to the teacher backward, e.g. ``(z * dLdz.detach()).sum().backward()``.
    ``radius`` (R = r / ||v||) may be a float or a 0-d device tensor; ``n_rows`` is the loss
    normaliser n (default: number of rows here; pass the global count under data parallel).
    """
    V = teacher_logits.shape[-1]
    shape = teacher_logits.shape
    ins = [
        x.reshape(-1, V)
        for x in (teacher_logits, student_logits, student_logits_plus, student_logits_minus)
    ]
    for x in ins[1:]:
        if x.shape != ins[0].shape:
            raise ValueError(f"shape mismatch: {tuple(x.shape)} vs {tuple(ins[0].shape)}")
    ins = [x if x.stride(-1) == 1 else x.contiguous() for x in ins]
    y = labels.reshape(-1)
    if y.numel() != ins[0].shape[0]:
        raise ValueError(f"labels has {y.numel()} entries, expected {ins[0].shape[0]} rows")
    n = n_rows if n_rows is not None else ins[0].shape[0]
    if backend_for(*ins) == "triton" and teacher_logits.dtype != torch.float64:
        from ._lgtm_grad_triton import lgtm_grad_triton

        coef = _coefs(alpha_teacher, temperature, eta, radius, max(n, 1), ins[0].device)
        y = y.to(device=ins[0].device, dtype=torch.int64).contiguous()
        g, infl = lgtm_grad_triton(*ins, y, coef, 1.0 / float(temperature))
    else:
        g, infl = lgtm_teacher_logit_grad_torch(
            *ins,
            y,
            alpha_teacher=alpha_teacher,
            temperature=temperature,
            eta=eta,
            radius=radius,
            n_rows=max(n, 1),
        )
        g = g.to(teacher_logits.dtype)
    return g.reshape(shape), infl
