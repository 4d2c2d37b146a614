"""The composed objectives vs autograd in float64: the cheap-form logit gradient equals the
logit-space derivative of L_t(theta) - eta * h, with and without the T^2 factor."""

import pytest
import torch

from lgtm_ds import losses


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
    obj = losses.teacher_loss(z, s, y, **kw) - eta * (
        losses.teacher_loss(z, sp, y, **kw) - losses.teacher_loss(z, sm, y, **kw)
    ) / (2 * R)
    (expected,) = torch.autograd.grad(obj, z)
    got, infl = losses.lgtm_teacher_logit_grad(
        z,
        s,
        sp,
        sm,
        y,
        alpha_teacher=a,
        temperature=temperature,
        eta=eta,
        radius=R,
        scale_by_t2=scale_by_t2,
    )
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-13)
    t2 = temperature**2 if scale_by_t2 else 1.0
    ref_infl = (
        -eta
        * t2
        * (losses.kd_per_row(sp, z, temperature) - losses.kd_per_row(sm, z, temperature))
        / (2 * R)
    )
    torch.testing.assert_close(infl, ref_infl.detach(), rtol=1e-10, atol=1e-14)


def test_student_loss_fp32_path_matches_fp64_oracle():
    g = torch.Generator().manual_seed(3)
    s64 = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t64 = torch.randn(9, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (9,), generator=g)
    s32 = s64.detach().float().requires_grad_()
    l64 = losses.student_loss(s64, t64, y, alpha=0.7, temperature=2.0)
    l32 = losses.student_loss(s32, t64.float(), y, alpha=0.7, temperature=2.0)
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
    obj = losses.teacher_loss(z, s, y, **kw) - eta * (
        losses.teacher_loss(z, sp, y, **kw) - losses.teacher_loss(z, sm, y, **kw)
    ) / (2 * R)
    (expected,) = torch.autograd.grad(obj, z)
    got, infl = losses.lgtm_teacher_logit_grad(
        z, s, sp, sm, y, alpha_teacher=a, temperature=2.0, eta=eta, radius=R
    )
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-13)
    ref = -eta * ((sp - z) ** 2 - (sm - z) ** 2).sum(-1) / (2 * R)
    torch.testing.assert_close(infl, ref.detach(), rtol=1e-10, atol=1e-14)
    term = losses.influence_logit_term(sp, sm, alpha_teacher=a, temperature=2.0, eta=eta, radius=R)
    (term_expected,) = torch.autograd.grad(
        -eta
        * (losses.teacher_loss(z, sp, y, **kw) - losses.teacher_loss(z, sm, y, **kw))
        / (2 * R),
        z,
    )
    torch.testing.assert_close(term, term_expected, rtol=1e-10, atol=1e-13)
