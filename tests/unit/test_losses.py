"""The composed objectives vs autograd in float64: the cheap-form logit gradient equals the
logit-space derivative of L_t(theta) - eta * h, with and without the T^2 factor."""

import dataclasses

import pytest
import torch

from lgtm_ds.tasks import get_task
from lgtm_ds.tasks.base import InfluenceParams

CLS, REG = get_task("classification")(), get_task("regression")()


@pytest.mark.parametrize("scale_by_t2", [False, True])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_teacher_logit_grad_matches_autograd(temperature, scale_by_t2):
    g = torch.Generator().manual_seed(int(temperature * 10) + scale_by_t2)
    n, c = 7, 5
    z = (torch.randn(n, c, generator=g, dtype=torch.float64) * 3).requires_grad_()
    s = torch.randn(n, c, generator=g, dtype=torch.float64)
    sp = s + 0.01 * torch.randn(n, c, generator=g, dtype=torch.float64)
    sm = s - 0.01 * torch.randn(n, c, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    a, eta, R = 0.4, 3e-2, 1.7e-2
    kw = dict(alpha=a, temperature=temperature, scale_by_t2=scale_by_t2)
    # G = grad L_t(theta) - eta * (grad L_t(theta+) - grad L_t(theta-)) / 2R, in logit space
    obj = CLS.distill_loss(z, s, y, **kw) - eta * (
        CLS.distill_loss(z, sp, y, **kw) - CLS.distill_loss(z, sm, y, **kw)
    ) / (2 * R)
    (expected,) = torch.autograd.grad(obj, z)
    p = InfluenceParams(a, temperature, eta, R, scale_by_t2)
    got, infl = CLS.lgtm_logit_grad(z, s, sp, sm, y, p)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-13)
    t2 = temperature**2 if scale_by_t2 else 1.0
    ref_infl = (
        -eta
        * t2
        * (CLS.kd_per_row(sp, z, temperature) - CLS.kd_per_row(sm, z, temperature))
        / (2 * R)
    )
    torch.testing.assert_close(infl, ref_infl.detach(), rtol=1e-10, atol=1e-14)
    # the influence part alone (what a bf16 teacher backpropagates separately)
    (term_expected,) = torch.autograd.grad(
        -eta * (CLS.distill_loss(z, sp, y, **kw) - CLS.distill_loss(z, sm, y, **kw)) / (2 * R), z
    )
    torch.testing.assert_close(
        CLS.influence_logit_term(sp, sm, p), term_expected, rtol=1e-10, atol=1e-13
    )

    # every quantity of LGTM's step D in one call (split: the main part with eta = 0 and the
    # term apart; the loss is L_t(z; s)), vs the separate calls in float64; in fp32 the term
    # (a difference of close probabilities) is as close to the float64 one as the old call's
    for dtype in (torch.float64, torch.float32):
        args = [x.detach().to(dtype) for x in (z, s, sp, sm)]
        rtol = 1e-10 if dtype == torch.float64 else 2e-5
        for split in (False, True):
            tp = CLS.lgtm_teacher_pass(*args, y, p, split=split)
            whole, infl_ = CLS.lgtm_logit_grad(*args, y, p)
            torch.testing.assert_close(tp.influence, infl_, rtol=rtol, atol=1e-7 * eta)
            loss = CLS.distill_loss(args[0], args[1], y, **kw)
            assert float(tp.loss) == pytest.approx(float(loss), rel=rtol)
            if not split:
                assert tp.term is None and torch.equal(tp.grad, whole)
                continue
            old = CLS.influence_logit_term(*args[2:], p)
            err_new = float((tp.term.double() - term_expected).abs().max())
            err_old = float((old.double() - term_expected).abs().max())
            assert err_new <= 3 * err_old + 1e-12 * float(term_expected.abs().max())
            main, _ = CLS.lgtm_logit_grad(*args, y, dataclasses.replace(p, eta=0.0))
            assert torch.equal(tp.grad, main)
    # regression composes its own forms
    tp = REG.lgtm_teacher_pass(z[:, :1].detach(), s[:, :1], sp[:, :1], sm[:, :1], y.double(), p)
    assert tp.loss.dim() == 0 and tp.influence.shape == (n,)


def test_student_loss_fp32_path_matches_fp64_oracle():
    g = torch.Generator().manual_seed(3)
    s64 = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t64 = torch.randn(9, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (9,), generator=g)
    s32 = s64.detach().float().requires_grad_()
    l64 = CLS.distill_loss(s64, t64, y, alpha=0.7, temperature=2.0)
    l32 = CLS.distill_loss(s32, t64.float(), y, alpha=0.7, temperature=2.0)
    l64.backward()
    l32.backward()
    assert abs(float(l32) - float(l64)) < 1e-6
    torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=1e-5, atol=1e-7)


def test_regression_teacher_logit_grad_matches_autograd():
    g = torch.Generator().manual_seed(11)
    n = 9
    z = torch.randn(n, 1, generator=g, dtype=torch.float64).requires_grad_()
    s = torch.randn(n, 1, generator=g, dtype=torch.float64)
    sp = s + 0.01 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    sm = s - 0.01 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    y = torch.rand(n, generator=g, dtype=torch.float64) * 5
    a, eta, R = 0.4, 3e-2, 1.7e-2
    kw = dict(alpha=a, temperature=2.0)  # temperature does not apply to regression
    obj = REG.distill_loss(z, s, y, **kw) - eta * (
        REG.distill_loss(z, sp, y, **kw) - REG.distill_loss(z, sm, y, **kw)
    ) / (2 * R)
    (expected,) = torch.autograd.grad(obj, z)
    p = InfluenceParams(alpha_teacher=a, temperature=2.0, eta=eta, radius=R)
    got, infl = REG.lgtm_logit_grad(z, s, sp, sm, y, p)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-13)
    ref = -eta * ((sp - z) ** 2 - (sm - z) ** 2).sum(-1) / (2 * R)
    torch.testing.assert_close(infl, ref.detach(), rtol=1e-10, atol=1e-14)
    term = REG.influence_logit_term(sp, sm, p)
    (term_expected,) = torch.autograd.grad(
        -eta * (REG.distill_loss(z, sp, y, **kw) - REG.distill_loss(z, sm, y, **kw)) / (2 * R),
        z,
    )
    torch.testing.assert_close(term, term_expected, rtol=1e-10, atol=1e-13)
