"""Chunked fused-linear losses: a decoder's output layer and its loss in one pass over row
chunks, so that no more than one chunk of the ``[N, V]`` logits ever exists.

``fused_linear_loss`` (any per-chunk loss) and ``fused_linear_logit_grad`` (any per-chunk logit
gradient) are the building blocks. ``fused_linear_kd_loss(h, W, ht, Wt, ...)`` equals
``kd_loss(h @ W.T + b, ht @ Wt.T + bt, ...)``
and ``fused_linear_cross_entropy(h, W, labels, ...)`` equals the token cross-entropy of
``h @ W.T + b``, with gradients to ``h``, ``W`` and ``b`` (the learner's side; the target side
of the KD loss gets none). The forward walks the rows in chunks of ``chunk_size``: the chunk's
logits (and the target's), its loss and its logit gradient (``kd_loss``: Triton on CUDA, the
torch reference elsewhere; the gradient overwrites the chunk's logits in place), then
``grad_h[chunk] = dz @ W`` and ``grad_W += dz.T @ h[chunk]`` (fp32 accumulation), and keeps
only the input-sized gradients for the backward (Liger-Kernel's chunked-loss idea). Extra
memory beyond the inputs and their gradients: a few ``chunk x V`` buffers and an fp32
``[V, H]`` accumulator.

Rows: ``h`` is ``[N, H]`` (the caller selects the valid token positions); ``mask`` [N] (True =
keep) and ``weights`` [N] as in ``kd_loss``. ``reduction``: "batchmean" divides by the rows kept
(or ``normalizer`` when given: e.g. the global token count over micro-batches and ranks), "sum"
does not. ``vocab_size`` cuts both output layers to their first ``V`` rows (a shared
vocabulary; rows past it get no gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kd_loss import kd_loss

IGNORE_INDEX = -100


CHUNK_LOGITS = 1 << 21  # logits per chunk: 8 MiB per fp32 chunk buffer


def default_chunk_size(n_rows: int, hidden: int, vocab: int) -> int:
    """Rows per chunk: the largest power of two with at most :data:`CHUNK_LOGITS` logits per
    chunk (64 rows at V = 32000, 16 at V = 128256), at least 1 and no more than the rows
    (rounded up to a power of two). Measured on CPU (fp32, N = 2048, V = 32000): 8 rows (Liger's
    rule, chunk logits ~ the hidden states' size) took 1.78x the full-logits time, 64 rows
    0.81x, 128 rows 0.74x; the peak memory grows with the chunk (~20 chunk buffers on the torch
    path)."""
    rows = max(1, CHUNK_LOGITS // max(vocab, 1))
    rows = 1 << (rows.bit_length() - 1)  # a power of two, <= the budget
    return max(1, min(rows, 1 << max(n_rows - 1, 0).bit_length()))


class _ChunkedLinearLoss(torch.autograd.Function):
    """``loss = scale * sum_chunks row_loss(h_c @ W.T + b, c)``; forward computes the input
    gradients chunk by chunk, backward rescales them."""

    @staticmethod
    def forward(ctx, h, weight, bias, row_loss, chunk, scale, vocab):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need = need_h or need_w or need_b
        W = weight[:vocab]
        b = bias[:vocab] if bias is not None else None
        n = h.shape[0]
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        grad_h = torch.zeros_like(h) if need_h else None
        grad_w = torch.zeros(W.shape, dtype=acc, device=W.device) if need_w else None
        grad_b = torch.zeros(W.shape[0], dtype=acc, device=W.device) if need_b else None
        total = torch.zeros((), dtype=acc, device=h.device)
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            hc = h[lo:hi]
            with torch.no_grad():
                z = F.linear(hc, W, b)
            if not need:
                with torch.no_grad():
                    total += row_loss(z, lo, hi).to(acc)
                continue
            z.requires_grad_(True)
            with torch.enable_grad():
                loss = row_loss(z, lo, hi)
                (dz,) = torch.autograd.grad(loss, z)
            total += loss.detach().to(acc)
            dz = dz.to(h.dtype)
            if need_h:
                grad_h[lo:hi] = dz @ W.to(dz.dtype)
            if need_w:
                grad_w.addmm_(dz.t().to(acc), hc.to(acc))
            if need_b:
                grad_b += dz.to(acc).sum(0)
            del z, dz, loss
        scale = scale.to(acc) if torch.is_tensor(scale) else torch.tensor(scale, dtype=acc)
        if need_h:
            grad_h.mul_(scale.to(grad_h.dtype))
        if need_w:
            gw = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
            gw[:vocab] = (grad_w * scale).to(weight.dtype)
            grad_w = gw
        if need_b:
            gb = torch.zeros(bias.shape, dtype=bias.dtype, device=bias.device)
            gb[:vocab] = (grad_b * scale).to(bias.dtype)
            grad_b = gb
        ctx.save_for_backward(
            *(g if g is not None else torch.empty(0) for g in (grad_h, grad_w, grad_b))
        )
        ctx.has = (need_h, need_w, need_b)
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):
        grads = []
        for g, has in zip(ctx.saved_tensors, ctx.has):
            if not has:
                grads.append(None)
                continue
            if not (grad_output.numel() == 1 and bool(grad_output == 1)):  # note: host sync
                g = g * grad_output.to(g.dtype)
            grads.append(g)
        return (*grads, None, None, None, None)


def fused_linear_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    row_loss,
    *,
    scale: float | torch.Tensor = 1.0,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``scale * sum over chunks of row_loss(z, lo, hi)``, ``z = hidden[lo:hi] @ weight[:V].T +
    bias[:V]`` the chunk's logits, with gradients to ``hidden``, ``weight`` and ``bias``: the
    building block of the losses below, for any per-row loss a caller writes (``row_loss``
    returns the chunk's summed loss, differentiable in ``z``; it may read its own chunk of other
    tensors by ``lo:hi``). Not twice differentiable: the input gradients are computed during
    the forward."""
    _check_rows(hidden, weight, bias, "fused_linear_loss")
    V = vocab_size or weight.shape[0]
    if V > weight.shape[0]:
        raise ValueError(f"vocab_size {V} exceeds the output layer's {weight.shape[0]} rows")
    chunk = chunk_size or default_chunk_size(hidden.shape[0], hidden.shape[1], V)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if not torch.is_tensor(scale):
        scale = torch.tensor(float(scale), dtype=acc, device=hidden.device)
    return _ChunkedLinearLoss.apply(hidden, weight, bias, row_loss, chunk, scale, V)


@torch.no_grad()
def fused_linear_logit_grad(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    logit_grad,
    *,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
):
    """Take a logit gradient that a caller computes chunk by chunk through the output layer:
    for each chunk ``dz, extra = logit_grad(z, lo, hi)`` (``z`` the chunk's logits ``hidden[lo:hi]
    @ weight[:V].T + bias[:V]``, ``dz`` of z's shape, ``extra`` a per-row tensor or None), and
    returns ``(grad_hidden`` in hidden's dtype, ``grad_weight``, ``grad_bias`` (None without a
    bias) in fp32 (float64 for float64 inputs), the ``extra`` rows concatenated or None``): the
    gradient with respect to the layer's input and parameters of any objective whose logit
    gradient is ``dz``. No graph, no full ``[N, V]`` tensor.

    Several gradients in one pass (the logits computed once): ``dz`` a tuple of ``k`` tensors
    gives tuples of ``k`` for ``grad_hidden``, ``grad_weight`` and ``grad_bias``; ``extra`` a
    tuple of per-row tensors gives a tuple of their concatenations (e.g. LGTM's main and
    influence parts of the teacher gradient kept apart, with the influence and the loss rows)."""
    _check_rows(hidden, weight, bias, "fused_linear_logit_grad")
    n = hidden.shape[0]
    V = vocab_size or weight.shape[0]
    if V > weight.shape[0]:
        raise ValueError(f"vocab_size {V} exceeds the output layer's {weight.shape[0]} rows")
    chunk = chunk_size or default_chunk_size(n, hidden.shape[1], V)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    W = weight[:V]
    b = bias[:V] if bias is not None else None
    grads, extras = None, None  # per gradient: [grad_h, grad_w, grad_b]; per extra: its rows
    multi_dz = multi_extra = False
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        hc = hidden[lo:hi]
        dz, extra = logit_grad(F.linear(hc, W, b), lo, hi)
        multi_dz = isinstance(dz, (tuple, list))
        dzs = tuple(dz) if multi_dz else (dz,)
        if grads is None:
            grads = [_grad_buffers(hidden, weight, bias, acc) for _ in dzs]
        if len(dzs) != len(grads):
            raise ValueError(
                f"fused_linear_logit_grad: logit_grad returned {len(dzs)} gradients for rows "
                f"{lo}:{hi}, {len(grads)} before"
            )
        for (grad_h, grad_w, grad_b), g in zip(grads, dzs):
            grad_h[lo:hi] = g.to(hidden.dtype) @ W.to(hidden.dtype)
            grad_w[:V].addmm_(g.t().to(acc), hc.to(acc))
            if grad_b is not None:
                grad_b[:V] += g.to(acc).sum(0)
        if extra is not None:
            multi_extra = isinstance(extra, (tuple, list))
            parts = tuple(extra) if multi_extra else (extra,)
            extras = [[] for _ in parts] if extras is None else extras
            for rows, e in zip(extras, parts):
                rows.append(e)
        del dz, dzs
    if grads is None:  # no rows: one gradient of zeros (the shape of a single-dz call)
        grads = [_grad_buffers(hidden, weight, bias, acc)]
    cat = [torch.cat(rows) for rows in extras] if extras is not None else None
    out_extra = (tuple(cat) if multi_extra else cat[0]) if cat is not None else None
    if multi_dz:
        grad_h, grad_w, grad_b = (tuple(g[i] for g in grads) for i in range(3))
        return grad_h, grad_w, grad_b, out_extra
    return (*grads[0], out_extra)


def _grad_buffers(hidden, weight, bias, acc):
    """``[grad_hidden, grad_weight, grad_bias]`` for one gradient through the output layer."""
    grad_h = torch.empty_like(hidden)
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    grad_b = (
        torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if bias is not None else None
    )
    return [grad_h, grad_w, grad_b]


def _check_rows(h, weight, bias, name: str) -> None:
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{name}: hidden states [N, H] and output weight [V, H] expected, got "
            f"{tuple(h.shape)} and {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"{name}: bias {tuple(bias.shape)} does not match weight rows")


def _scale(n, mask, reduction, normalizer, device, dtype):
    if reduction not in ("batchmean", "sum"):
        raise ValueError(f"reduction must be batchmean or sum, got {reduction!r}")
    if reduction == "sum":
        return torch.ones((), dtype=dtype, device=device)
    if normalizer is not None:
        return 1.0 / torch.as_tensor(normalizer, dtype=dtype, device=device).clamp_min(1)
    if mask is not None:
        return 1.0 / mask.sum().to(dtype).clamp_min(1)
    return torch.tensor(1.0 / max(n, 1), dtype=dtype, device=device)


def fused_linear_kd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target_hidden: torch.Tensor,
    target_weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    target_bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    scale_by_t2: bool = False,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
    normalizer: float | torch.Tensor | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``kd_loss(hidden @ weight.T + bias, target_hidden @ target_weight.T + target_bias)``
    without the full logits (see the module docstring); gradients to ``hidden``, ``weight``,
    ``bias`` only."""
    _check_rows(hidden, weight, bias, "fused_linear_kd_loss")
    _check_rows(target_hidden, target_weight, target_bias, "fused_linear_kd_loss (target)")
    n = hidden.shape[0]
    if target_hidden.shape[0] != n:
        raise ValueError(
            f"fused_linear_kd_loss: {n} learner rows vs {target_hidden.shape[0]} target rows"
        )
    V = vocab_size or min(weight.shape[0], target_weight.shape[0])
    if V > min(weight.shape[0], target_weight.shape[0]):
        raise ValueError(f"vocab_size {V} exceeds an output layer's rows")
    chunk = chunk_size or default_chunk_size(n, hidden.shape[1], V)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    w_rows = weights.reshape(-1) if weights is not None else None
    m_rows = mask.reshape(-1).bool() if mask is not None else None
    Wt = target_weight.detach()[:V]
    bt = target_bias.detach()[:V] if target_bias is not None else None
    ht = target_hidden.detach()

    def row_loss(z, lo, hi):
        with torch.no_grad():
            zt = F.linear(ht[lo:hi], Wt, bt)
        return kd_loss(
            z,
            zt,
            temperature=temperature,
            divergence=divergence,
            beta=beta,
            weights=w_rows[lo:hi] if w_rows is not None else None,
            mask=m_rows[lo:hi] if m_rows is not None else None,
            reduction="sum",
            scale_by_t2=scale_by_t2,
            inplace_grad=True,
            backend=backend,
        )

    scale = _scale(n, m_rows, reduction, normalizer, hidden.device, acc)
    return _ChunkedLinearLoss.apply(hidden, weight, bias, row_loss, chunk, scale, V)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    reduction: str = "batchmean",
    normalizer: float | torch.Tensor | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Token cross-entropy of ``hidden @ weight.T + bias`` against ``labels`` [N] (``-100`` =
    ignored) without the full logits; "batchmean" divides by the non-ignored rows (or
    ``normalizer``). Computed in fp32 (float64 for float64 inputs)."""
    _check_rows(hidden, weight, bias, "fused_linear_cross_entropy")
    n = hidden.shape[0]
    y = labels.reshape(-1)
    if y.numel() != n:
        raise ValueError(f"fused_linear_cross_entropy: {y.numel()} labels for {n} rows")
    V = vocab_size or weight.shape[0]
    chunk = chunk_size or default_chunk_size(n, hidden.shape[1], V)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32

    def row_loss(z, lo, hi):
        return F.cross_entropy(z.to(acc), y[lo:hi], ignore_index=IGNORE_INDEX, reduction="sum")

    scale = _scale(n, y != IGNORE_INDEX, reduction, normalizer, hidden.device, acc)
    return _ChunkedLinearLoss.apply(hidden, weight, bias, row_loss, chunk, scale, V)


@torch.no_grad()
def fused_linear_lgtm_teacher_grad(
    teacher: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    student: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    student_plus: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    student_minus: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    labels: torch.Tensor,
    *,
    alpha_teacher: float,
    temperature: float,
    eta: float,
    radius,
    n_rows: int | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
):
    """LGTM's teacher logit gradient (``lgtm_teacher_logit_grad``) taken through the teacher's
    output layer, chunk by chunk, from hidden states instead of logits.

    ``teacher``, ``student``, ``student_plus``, ``student_minus``: ``(hidden [N, H], weight
    [V, H], bias [V] or None)`` of the teacher and of the student at theta and theta +- R v (the
    perturbed output layer included). Returns ``(grad_hidden [N, H_t]`` in the teacher hidden
    states' dtype, ``grad_weight [V_t, H_t]`` and ``grad_bias [V_t]`` (None without a bias) in
    fp32 (float64 for float64 inputs), ``influence [N]``): the gradient of the LGTM teacher
    objective with respect to the teacher's last hidden states and output layer, and each row's
    distillation influence. Backpropagate with ``(h_t * grad_hidden).sum()`` through the
    teacher's body and add ``grad_weight`` / ``grad_bias`` to its output layer's gradient.
    ``n_rows``: the loss normaliser (default N; pass the global row count under accumulation
    or data parallelism)."""
    from .lgtm_grad import lgtm_teacher_logit_grad

    parts = (teacher, student, student_plus, student_minus)
    names = ("teacher", "student", "student_plus", "student_minus")
    for (h, w, b), name in zip(parts, names):
        _check_rows(h, w, b, f"fused_linear_lgtm_teacher_grad ({name})")
    n = teacher[0].shape[0]
    for (h, _, _), name in zip(parts[1:], names[1:]):
        if h.shape[0] != n:
            raise ValueError(
                f"fused_linear_lgtm_teacher_grad: {name} has {h.shape[0]} rows, the teacher {n}"
            )
    y = labels.reshape(-1)
    if y.numel() != n:
        raise ValueError(f"fused_linear_lgtm_teacher_grad: {y.numel()} labels for {n} rows")
    V = vocab_size or min(w.shape[0] for _, w, _ in parts)
    if V > min(w.shape[0] for _, w, _ in parts):
        raise ValueError(f"vocab_size {V} exceeds an output layer's rows")
    ht, wt, bt = teacher
    others = [(h, w[:V], b[:V] if b is not None else None) for h, w, b in parts[1:]]
    n_norm = n_rows if n_rows is not None else n

    acc = torch.float64 if ht.dtype == torch.float64 else torch.float32

    def logit_grad(z, lo, hi):
        s, sp, sm = (F.linear(h[lo:hi], w, b) for h, w, b in others)
        dz, infl = lgtm_teacher_logit_grad(
            z,
            s,
            sp,
            sm,
            y[lo:hi],
            alpha_teacher=alpha_teacher,
            temperature=temperature,
            eta=eta,
            radius=radius,
            n_rows=n_norm,
        )
        return dz, infl.to(acc)

    return fused_linear_logit_grad(ht, wt, bt, logit_grad, vocab_size=V, chunk_size=chunk_size)
