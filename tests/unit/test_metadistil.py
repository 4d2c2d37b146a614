"""MetaDistil: the teacher's gradient equals the exact second-order meta-gradient of an
independent float64 oracle (double backward through the pilot SGD step, on the models'
parameters), for classifiers and decoders, with accumulation and the teacher's own CE; the
student is untouched by the pilot; the method runs through the trainer."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from lgtm_ds import Distiller
from lgtm_ds.engines import get_logits, model_inputs
from lgtm_ds.engines.head import HeadOutput
from lgtm_ds.engines.optim import build_adamw
from lgtm_ds.tasks import get_task

from ..helpers import (
    capture_grads,
    lm_batch,
    make_distiller,
    random_batch,
    tiny_decoder,
    tiny_model,
)


def _call(model, params, batch):
    names = [n for n, _ in model.named_parameters()]
    return get_logits(
        functional_call(model, dict(zip(names, params)), args=(), kwargs=model_inputs(batch))
    )


def _rows(logits, labels, causal):
    """(rows [N, V], targets [N]) of the positions that carry a loss."""
    if not causal:
        return logits, labels
    keep = labels[:, 1:] != -100
    return logits[:, :-1][keep], labels[:, 1:][keep]


def oracle_teacher_grad(t, s, micro, quiz, *, lam, alpha, T, beta, ce_w, causal):
    """d/dphi [ CE_q(theta - lam * grad_theta L_s(theta; z(phi))) + ce_w * CE_t(phi) ] by
    double backward through both networks, in float64; L_s over the whole global batch."""
    phi = [p.detach().clone().requires_grad_() for p in t.parameters()]
    theta = [p.detach().clone().requires_grad_() for p in s.parameters()]
    zs, ss, ys = [], [], []
    for mb in micro:
        z, y = _rows(_call(t, phi, mb), mb["labels"], causal)
        sl, _ = _rows(_call(s, theta, mb), mb["labels"], causal)
        zs.append(z), ss.append(sl), ys.append(y)
    z, sl, y = torch.cat(zs), torch.cat(ss), torch.cat(ys)
    lp, lq = F.log_softmax(z / T, -1), F.log_softmax(sl / T, -1)
    if beta == 0.0:
        kd = (lp.exp() * (lp - lq)).sum(-1)
    else:  # generalised JSD, mixture m = beta p + (1 - beta) q
        lm = torch.log(beta * lp.exp() + (1 - beta) * lq.exp())
        kd = beta * (lp.exp() * (lp - lm)).sum(-1) + (1 - beta) * (lq.exp() * (lq - lm)).sum(-1)
    loss_s = alpha * kd.mean() + (1 - alpha) * F.cross_entropy(sl, y)
    g = torch.autograd.grad(loss_s, theta, create_graph=True)
    pilot = [th - lam * gi for th, gi in zip(theta, g)]
    qz, qy = [], []
    for qb in quiz:
        r, yq = _rows(_call(s, pilot, qb), qb["labels"], causal)
        qz.append(r), qy.append(yq)
    total = F.cross_entropy(torch.cat(qz), torch.cat(qy))
    if ce_w:
        total = total + ce_w * F.cross_entropy(z, y)
    return torch.autograd.grad(total, phi)


def _rel(a, b):
    a = torch.cat([x.reshape(-1) for x in a])
    b = torch.cat([x.reshape(-1) for x in b])
    return float((a - b).norm() / b.norm())


CASES = {
    # name: (causal, micro sizes, quiz sizes, alpha_student, T, jsd_beta, teacher_ce_weight)
    "cls": (False, [9], [7], 0.7, 2.0, 0.0, 0.0),
    "cls_gas2_ce": (False, [5, 4], [4, 3], 0.6, 1.0, 0.0, 0.3),
    "cls_jsd": (False, [9], [7], 1.0, 1.5, 0.4, 0.0),
    "lm": (True, [5], [4], 0.8, 1.0, 0.0, 0.0),
    "lm_gas2": (True, [3, 4], [3, 2], 0.5, 2.0, 0.0, 0.2),
    # the fused head: hidden states + output layer, the meta-gradient chunk by chunk (3 rows)
    "lm_fused": (True, [5], [4], 0.8, 1.0, 0.0, 0.0),
    "lm_fused_gas2_jsd": (True, [3, 4], [3, 2], 0.5, 2.0, 0.3, 0.2),
}


@pytest.mark.slow  # the fast lane (tests/unit -m 'not slow') leaves it out
@pytest.mark.parametrize("name", list(CASES))
def test_teacher_gradient_matches_float64_second_order_oracle(name, monkeypatch):
    causal, sizes, qsizes, alpha, T, beta, ce_w = CASES[name]
    fused = "fused" in name
    if fused:  # no full [B, L, V] logits anywhere on the fused path

        def _boom(self):
            raise AssertionError("full logits formed on the fused-head path")

        monkeypatch.setattr(HeadOutput, "full_logits", _boom)
    if causal:
        t = tiny_decoder("gpt2-teacher", seed=1, dtype=torch.float64)
        s = tiny_decoder("gpt2-student", seed=2, dtype=torch.float64)
        make = lm_batch
    else:
        t = tiny_model(torch.float64, seed=1, size="student")
        s = tiny_model(torch.float64, seed=2)
        make = random_batch
    t_ref, s_ref = copy.deepcopy(t), copy.deepcopy(s)
    to, so = build_adamw(t, 3e-3, 0.01), build_adamw(s, 5e-3, 0.01)
    grads = capture_grads(to, list(t.parameters()))
    lam = 0.05
    d = Distiller(
        "metadistil",
        teacher=t,
        student=s,
        teacher_optimizer=to,
        student_optimizer=so,
        gradient_accumulation_steps=len(sizes),
        alpha_student=alpha,
        temperature=T,
        jsd_beta=beta,
        pilot_lr=lam,
        teacher_ce_weight=ce_w,
        task=get_task("causal_lm")(head_chunk=3) if causal else "classification",
        fused_head=fused,
    )
    assert d.student.fused_head == d.teacher.fused_head == fused
    for step in range(2):  # the second step starts from updated models and Adam state
        micro = [make(n, 100 * step + i) for i, n in enumerate(sizes)]
        quiz = [make(n, 100 * step + 50 + i) for i, n in enumerate(qsizes)]
        s_before = [p.detach().clone() for p in s.parameters()]
        with sdpa_kernel([SDPBackend.MATH]):
            want = oracle_teacher_grad(
                t_ref,
                s_ref,
                micro,
                quiz,
                lam=lam,
                alpha=alpha,
                T=T,
                beta=beta,
                ce_w=ce_w,
                causal=causal,
            )
        m = d.method.teacher_update(micro, quiz)
        assert all(torch.equal(a, b) for a, b in zip(s.parameters(), s_before))  # pilot only
        err = _rel(grads[-1], want)
        assert err < 1e-9, f"{name} step {step}: teacher meta-gradient rel. error {err:.2e}"
        assert m["meta_grad_norm"] > 0 and m["pilot_lr"] == lam
        d.method.student_update(micro)
        # the reference models take the same update (copy the new values over)
        with torch.no_grad():
            for a, b in zip(t_ref.parameters(), t.parameters()):
                a.copy_(b)
            for a, b in zip(s_ref.parameters(), s.parameters()):
                a.copy_(b)


def test_pilot_lr_defaults_to_the_student_lr_and_the_method_learns():
    t, s = tiny_model(seed=1, size="student"), tiny_model(seed=2)
    t0 = [p.detach().clone() for p in t.parameters()]
    d = make_distiller("metadistil", t, s, lrs=(1e-3, 7e-4))
    m = d.step(random_batch(8, 1), random_batch(8, 2))
    assert m["pilot_lr"] == pytest.approx(7e-4) and "student_loss" in m
    assert any(not torch.equal(p, p0) for p, p0 in zip(t.parameters(), t0))


@pytest.mark.slow  # the fast lane (tests/unit -m 'not slow') leaves it out
@pytest.mark.parametrize("method", ["metadistil", "lgtm"])
def test_activation_checkpointing_gives_the_same_steps(method):
    """Checkpointing is switched off for the JVP (no graph there) and back on after; the quiz
    gradient at the pilot / look-ahead parameters recomputes its activations at those
    parameters, not at the module's own (LGTM was 1.2e-4 off before that fix)."""
    runs = []
    for ckpt in (False, True):
        t = tiny_model(torch.float64, seed=1, size="student")
        s = tiny_model(torch.float64, seed=2)
        if ckpt:
            for m in (t, s):
                m.gradient_checkpointing_enable({"use_reentrant": False})
        d = make_distiller(method, t, s)
        for i in range(2):
            d.step(random_batch(8, i), random_batch(8, 10 + i))
        runs.append([p.detach().clone() for p in [*t.parameters(), *s.parameters()]])
        if ckpt:
            assert all(
                m.gradient_checkpointing
                for m in s.modules()
                if hasattr(m, "gradient_checkpointing")
            )
    assert max(float((a - b).abs().max()) for a, b in zip(*runs)) < 1e-12
