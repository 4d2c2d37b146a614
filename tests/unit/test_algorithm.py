"""The LGTM step on plain modules: cheap form == reference form, FD == exact hypergradient,
look-ahead == a real AdamW step, bit-exact student restore, bf16 influence vs float64."""

import copy

import pytest
import torch

from lgtm_ds import ConfigError, Distiller
from lgtm_ds.engines import TorchEngine, get_logits, model_inputs
from lgtm_ds.engines.optim import build_adamw
from lgtm_ds.methods.lookahead import adamw_lookahead
from lgtm_ds.methods.naive import naive_lgtm_step
from lgtm_ds.tasks import get_task

from ..helpers import capture_grads as _capture_grads
from ..helpers import random_batch, tiny_model

CLS = get_task("classification")()


def _flat(tensors):
    return torch.cat([t.reshape(-1).double() for t in tensors])


def _rel(a, b):
    a, b = _flat(a), _flat(b)
    return float((a - b).norm() / b.norm())


def _pair(dtype=torch.float64, lr_t=3e-3, lr_s=5e-3):
    t, s = tiny_model(dtype, seed=1), tiny_model(dtype, seed=2)
    return t, s, build_adamw(t, lr_t, 0.01), build_adamw(s, lr_s, 0.01)


@pytest.mark.parametrize(
    "alpha_teacher,temperature", [(0.4, 1.0), pytest.param(0.7, 2.0, marks=pytest.mark.slow)]
)
def test_cheap_form_matches_reference_form_fp64(alpha_teacher, temperature):
    t, s, to, so = _pair()
    t2, s2, to2, so2 = copy.deepcopy((t, s, to, so))
    d = Distiller(
        "lgtm",
        teacher=t,
        student=s,
        teacher_optimizer=to,
        student_optimizer=so,
        alpha_student=0.8,
        alpha_teacher=alpha_teacher,
        temperature=temperature,
    )
    cheap_g = _capture_grads(to, list(t.parameters()))
    for step in range(3):
        b, q = random_batch(9, 100 + step), random_batch(7, 200 + step)  # odd sizes
        m = d.step(b, q)
        ref = naive_lgtm_step(
            t2,
            s2,
            to2,
            so2,
            b,
            q,
            alpha_student=0.8,
            alpha_teacher=alpha_teacher,
            temperature=temperature,
        )
        err = _rel(cheap_g[-1], ref["G"])
        assert err < 1e-6, f"step {step}: teacher gradient rel. error {err:.2e}"
        assert m["fd_R"] == pytest.approx(ref["fd_R"], rel=1e-10)
        assert _rel(list(t.parameters()), list(t2.parameters())) < 1e-10
        assert _rel(list(s.parameters()), list(s2.parameters())) < 1e-10


def _exact_hypergradient(t, s, batch, v, alpha_teacher, temperature):
    """grad_phi ( grad_theta L_t(phi, theta) . v ) by double backward, float64."""
    t_params = [p for p in t.parameters()]
    s_params = [p for p in s.parameters()]
    x, y = model_inputs(batch), batch["labels"]
    lt = CLS.distill_loss(
        get_logits(t(**x)), get_logits(s(**x)), y, alpha=alpha_teacher, temperature=temperature
    )
    # L_t's student dependence is through the KD target: differentiate the target too
    z = get_logits(t(**x))
    s_logits = get_logits(s(**x))
    log_q = torch.log_softmax(z / temperature, -1)
    p_s = torch.softmax(s_logits / temperature, -1)
    kd = (p_s * (torch.log_softmax(s_logits / temperature, -1) - log_q)).sum(-1).mean()
    lt = alpha_teacher * kd + (1 - alpha_teacher) * CLS.task_loss(z, y)
    g_theta = torch.autograd.grad(lt, s_params, create_graph=True)
    dot = sum((gi * vi).sum() for gi, vi in zip(g_theta, v))
    return torch.autograd.grad(dot, t_params)


def _fd_error(r):
    """h = (grad_phi L_t(theta + Rv) - grad_phi L_t(theta - Rv)) / 2R, recovered from the
    production teacher gradient G = grad_phi L_t(theta) - eta h, vs double backward."""
    t, s, to, so = _pair()
    b, q = random_batch(9, 7), random_batch(7, 8)
    # v and R exactly as the step forms them
    engine = TorchEngine(s, so)
    with torch.no_grad():
        t_logits = get_logits(t(**model_inputs(b)))
    ls = CLS.distill_loss(
        get_logits(s(**model_inputs(b))), t_logits, b["labels"], alpha=1.0, temperature=1.0
    )
    g = torch.autograd.grad(ls, engine.params())
    look = [
        x.requires_grad_() for x in adamw_lookahead(engine.master_params(), g, engine.adam_state())
    ]
    ce = CLS.task_loss(engine.functional_forward(look, q), q["labels"])
    v = torch.autograd.grad(ce, look)
    exact = _exact_hypergradient(t, s, b, v, 0.4, 1.0)
    g0 = torch.autograd.grad(
        CLS.distill_loss(
            get_logits(t(**model_inputs(b))),
            get_logits(s(**model_inputs(b))).detach(),
            b["labels"],
            alpha=0.4,
            temperature=1.0,
        ),
        list(t.parameters()),
    )
    d = Distiller(
        "lgtm",
        teacher=t,
        student=s,
        teacher_optimizer=to,
        student_optimizer=so,
        alpha_student=1.0,  # as the oracle's L_s above
        fd_radius=r,
    )
    rec = _capture_grads(to, list(t.parameters()))
    m = d.step(b, q)
    eta, R = m["eta"], m["fd_R"]
    h = [(a - gg) / eta for a, gg in zip(g0, rec[0])]
    return _rel(h, exact), R


@pytest.mark.slow  # the fast lane (tests/unit -m 'not slow') leaves it out
def test_finite_difference_matches_exact_hypergradient():
    """Central difference: relative error O(R^2). Measured (fp64, tiny BERTs): 1.25e-3 at the
    default r = 1e-2, and 4x smaller for every halving of r."""
    errs = {r: _fd_error(r) for r in (2e-2, 1e-2, 5e-3)}
    for r, (err, R) in errs.items():
        print(f"FD vs exact hypergradient: r={r:g} R={R:.3g} relative error {err:.3e}")
    assert errs[1e-2][0] < 3e-3
    for big, small in ((2e-2, 1e-2), (1e-2, 5e-3)):
        ratio = errs[big][0] / errs[small][0]
        assert 3.0 < ratio < 5.0, f"error ratio {ratio:.2f} for halving r: not O(R^2)"


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-14), (torch.float32, 2e-6)])
def test_lookahead_equals_a_real_adamw_step_and_leaves_state_alone(dtype, tol):
    """fp64: the loop; fp32: lgtm_kernels.adamw_lookahead_ (per param group)."""
    s = tiny_model(dtype, seed=3)
    opt = build_adamw(s, 1e-2, 0.1)
    engine = TorchEngine(s, opt)
    for k in range(2):  # non-trivial moments and step count
        loss = CLS.task_loss(
            get_logits(s(**model_inputs(random_batch(5, k)))), random_batch(5, k)["labels"]
        )
        loss.backward()
        opt.step()
        opt.zero_grad()
    b = random_batch(6, 9)
    g = torch.autograd.grad(CLS.task_loss(engine.forward(b), b["labels"]), engine.params())
    state_before = copy.deepcopy(opt.state_dict())
    look = adamw_lookahead(engine.master_params(), g, engine.adam_state())
    # LGTM's call: the result written into its (spent) gradient, the same values
    spent = [gi.detach().to(look[0].dtype).clone() for gi in g]
    reused = engine.lookahead(engine.master_params(), spent, adamw_lookahead, reuse_g=True)
    assert all(x is y and torch.equal(x, z) for x, y, z in zip(reused, spent, look))
    s2, opt2 = copy.deepcopy((s, opt))
    for p, gi in zip(s2.parameters(), g):
        p.grad = gi.clone()
    opt2.step()
    assert all(x.dtype == dtype for x in look)
    # relative to the size of the update, not of the parameters
    upd = [x - p for x, p in zip(look, s.parameters())]
    ref = [x - p for x, p in zip(s2.parameters(), s.parameters())]
    assert _rel(upd, ref) < tol
    after = opt.state_dict()
    for k, st in state_before["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(st[key], after["state"][k][key])


def test_a_low_precision_plain_teacher_is_warned_about():
    """Plain bf16 modules keep bf16 gradients: LGTM's influence term (and MetaDistil's
    meta-gradient beside the teacher's CE) would round away silently; a warning says so."""
    import warnings

    def make(method, dtype, **hp):
        t, s = tiny_model(dtype, seed=1), tiny_model(seed=2)
        opt = dict(
            teacher_optimizer=build_adamw(t, 1e-3, 0), student_optimizer=build_adamw(s, 1e-3, 0)
        )
        return Distiller(method, teacher=t, student=s, **opt, **hp)

    with pytest.warns(UserWarning, match="lgtm: .*bfloat16.* influence term .* rounds away"):
        make("lgtm", torch.bfloat16)
    with pytest.warns(UserWarning, match="metadistil: .* meta-gradient beside the teacher's CE"):
        make("metadistil", torch.bfloat16, teacher_ce_weight=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make("lgtm", torch.float32)
        make("online_kd", torch.bfloat16)
        make("metadistil", torch.bfloat16)  # the meta-gradient alone keeps its relative precision


@pytest.mark.slow  # the fast lane (tests/unit -m 'not slow') leaves it out
@pytest.mark.filterwarnings("ignore:lgtm. the teacher's parameters")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_student_bit_identical_after_influence_passes(dtype):
    t, s = tiny_model(dtype, seed=1), tiny_model(dtype, seed=2)
    so = build_adamw(s, 1e-3, 0.01)
    d = Distiller(
        "lgtm",
        teacher=t,
        student=s,
        teacher_optimizer=build_adamw(t, 1e-3, 0.0),
        student_optimizer=so,
    )
    d.step(random_batch(8, 1), random_batch(8, 2))  # moments exist
    before = [p.detach().clone() for p in s.parameters()]
    state = copy.deepcopy(so.state_dict())
    d.method.teacher_update([random_batch(8, 3)], [random_batch(8, 4)])
    for p, p0 in zip(s.parameters(), before):
        assert torch.equal(p, p0)  # bitwise
    for k, st in state["state"].items():
        assert torch.equal(st["exp_avg"], so.state_dict()["state"][k]["exp_avg"])


def _influence_term(dtype, t64, s64, b, q, eta=1e-3):
    """eta a_t (q+ - q-) / (2 R T n) of one step and the per-sample influence, at ``dtype``."""
    t, s = copy.deepcopy(t64).to(dtype), copy.deepcopy(s64).to(dtype)
    to = torch.optim.AdamW(t.parameters(), lr=eta)
    so = torch.optim.AdamW(s.parameters(), lr=1e-3)
    seen = {}

    class Spy(type(CLS)):
        def lgtm_teacher_pass(self, z, s_logits, s_plus, s_minus, labels, p, **kw):
            seen["term"] = (
                (torch.softmax(s_plus.double(), -1) - torch.softmax(s_minus.double(), -1))
                * p.eta
                * 0.4
                / (2 * p.radius * z.shape[0])
            )
            return super().lgtm_teacher_pass(z, s_logits, s_plus, s_minus, labels, p, **kw)

    d = Distiller(
        "lgtm", teacher=t, student=s, teacher_optimizer=to, student_optimizer=so, task=Spy()
    )
    m = d.step(b, q)
    return seen["term"].reshape(-1), m["influence"].double()


@pytest.mark.slow  # the fast lane (tests/unit -m 'not slow') leaves it out
def test_bf16_influence_term_agrees_with_fp64():
    t64, s64 = tiny_model(torch.float64, seed=1, size="student"), tiny_model(torch.float64, seed=2)
    b, q = random_batch(16, 5), random_batch(16, 6)
    term64, infl64 = _influence_term(torch.float64, t64, s64, b, q)
    term16, infl16 = _influence_term(torch.bfloat16, t64, s64, b, q)
    cos_term = float(torch.nn.functional.cosine_similarity(term16, term64, dim=0))
    cos_infl = float(torch.nn.functional.cosine_similarity(infl16, infl64, dim=0))
    print(
        f"bf16 vs fp64 cosine: influence term {cos_term:.4f}, per-sample influence {cos_infl:.4f}"
    )
    assert cos_term > 0.999 and cos_infl > 0.999  # measured 1.0000 / 0.9999


@pytest.mark.slow  # the fast lane (tests/unit -m 'not slow') leaves it out
def test_accumulation_equals_one_big_batch_fp64():
    t, s, to, so = _pair()
    t2, s2, to2, so2 = copy.deepcopy((t, s, to, so))
    d1 = Distiller("lgtm", teacher=t, student=s, teacher_optimizer=to, student_optimizer=so)
    d2 = Distiller(
        "lgtm",
        teacher=t2,
        student=s2,
        teacher_optimizer=to2,
        student_optimizer=so2,
        gradient_accumulation_steps=2,
    )
    for step in range(2):
        b, q = random_batch(8, 30 + step), random_batch(8, 40 + step)
        half = [{k: v[:4] for k, v in x.items()} for x in (b, q)]
        rest = [{k: v[4:] for k, v in x.items()} for x in (b, q)]
        d1.step(b, q)
        d2.step([half[0], rest[0]], [half[1], rest[1]])
    assert _rel(list(t2.parameters()), list(t.parameters())) < 1e-10
    assert _rel(list(s2.parameters()), list(s.parameters())) < 1e-10


def test_methods_and_api():
    b, q = random_batch(8, 1), random_batch(8, 2)
    for method in ("lgtm", "online_kd", "vanilla_kd"):
        t, s, to, so = _pair(torch.float32)
        t0 = [p.detach().clone() for p in t.parameters()]
        s0 = [p.detach().clone() for p in s.parameters()]
        d = Distiller(
            method,
            teacher=t,
            student=s,
            teacher_optimizer=to,
            student_optimizer=so,
            alpha_student=1.0,
            alpha_teacher=0.4,
            temperature=1.0,
            fd_radius=1e-2,
        )
        m = d.step(b, q)
        assert "student_loss" in m
        teacher_moved = any(not torch.equal(p, p0) for p, p0 in zip(t.parameters(), t0))
        assert teacher_moved == (method != "vanilla_kd")
        assert any(not torch.equal(p, p0) for p, p0 in zip(s.parameters(), s0))
        if method == "lgtm":
            assert m["influence"].shape == (8,) and torch.isfinite(m["influence"]).all()
            assert m["influence"].abs().sum() > 0
    ft = d.teacher_finetune_step(b)
    assert ft["teacher_ce"] > 0
    with pytest.raises(ConfigError, match="quiz_batch"):
        Distiller("lgtm", teacher=t, student=s, teacher_optimizer=to, student_optimizer=so).step(b)
    with pytest.raises(ConfigError, match="method.name must be one of .*did you mean 'lgtm'"):
        Distiller("lgtm2", teacher=t, student=s, teacher_optimizer=to, student_optimizer=so)


def test_teacher_overflow_skips_the_student_step_too():
    class Overflowing(TorchEngine):
        step_skipped = True  # as a DeepSpeed fp16 engine reports after an overflow

    t, s, to, so = _pair(torch.float32)
    s0 = [p.detach().clone() for p in s.parameters()]
    d = Distiller("online_kd", teacher=Overflowing(t, to), student=s, student_optimizer=so)
    m = d.step(random_batch(8, 1))
    assert m["skipped"] and "student_loss" not in m
    assert all(torch.equal(p, p0) for p, p0 in zip(s.parameters(), s0))


@pytest.mark.slow  # the fast lane (tests/unit -m 'not slow') leaves it out
def test_cheap_form_matches_reference_form_regression_fp64():
    """GLUE stsb-style heads (one output, float labels): MSE distillation, same exact form."""
    t, s = (
        tiny_model(torch.float64, seed=1, num_labels=1),
        tiny_model(torch.float64, seed=2, num_labels=1),
    )
    to, so = build_adamw(t, 3e-3, 0.01), build_adamw(s, 5e-3, 0.01)
    t2, s2, to2, so2 = copy.deepcopy((t, s, to, so))
    d = Distiller(
        "lgtm",
        teacher=t,
        student=s,
        teacher_optimizer=to,
        student_optimizer=so,
        alpha_student=0.5,
        task="regression",
    )
    cheap_g = _capture_grads(to, list(t.parameters()))
    for step in range(3):
        b = random_batch(9, 100 + step, regression=True)
        q = random_batch(7, 200 + step, regression=True)
        m = d.step(b, q)
        ref = naive_lgtm_step(t2, s2, to2, so2, b, q, alpha_student=0.5, task="regression")
        err = _rel(cheap_g[-1], ref["G"])
        assert err < 1e-6, f"step {step}: teacher gradient rel. error {err:.2e}"
        assert m["influence"].shape == (9,) and m["influence"].abs().sum() > 0
        assert _rel(list(s.parameters()), list(s2.parameters())) < 1e-10


class _SmoothedCE(type(CLS)):
    """A user's task: label-smoothed CE (its own task_loss, no closed form declared)."""

    def task_loss(self, logits, labels):
        return torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.2)


class _HuberRegression(type(get_task("regression")())):
    """A user's regression task: Huber loss instead of the squared error."""

    def task_loss(self, logits, labels):
        y = labels.to(logits.dtype)
        return torch.nn.functional.huber_loss(logits.squeeze(-1), y, delta=0.3)


@pytest.mark.slow  # the fast lane (tests/unit -m 'not slow') leaves it out
@pytest.mark.parametrize("task_cls", [_SmoothedCE, _HuberRegression])
def test_a_tasks_own_loss_reaches_the_teacher_logit_gradient(task_cls):
    """A Task subclass that overrides task_loss: the LGTM teacher gradient is that of ITS
    objective (the reference form differentiates ``distill_loss``, which calls task_loss),
    not the closed form's CE/MSE (which would differ by (1 - a_t) x the loss difference)."""
    task, regression = task_cls(), task_cls is _HuberRegression
    assert not task.task_loss_is_closed_form() and CLS.task_loss_is_closed_form()
    labels = 1 if regression else 3
    t = tiny_model(torch.float64, seed=1, num_labels=labels)
    s = tiny_model(torch.float64, seed=2, num_labels=labels)
    to, so = build_adamw(t, 3e-3, 0.01), build_adamw(s, 5e-3, 0.01)
    t2, s2, to2, so2 = copy.deepcopy((t, s, to, so))
    kw = dict(alpha_student=0.5, alpha_teacher=0.3)
    d = Distiller("lgtm", teacher=t, student=s, teacher_optimizer=to, student_optimizer=so,
                  task=task, **kw)  # fmt: skip
    cheap_g = _capture_grads(to, list(t.parameters()))
    for step in range(3):
        b = random_batch(9, 100 + step, regression=regression)
        q = random_batch(7, 200 + step, regression=regression)
        d.step(b, q)
        ref = naive_lgtm_step(t2, s2, to2, so2, b, q, task=task_cls(), **kw)
        err = _rel(cheap_g[-1], ref["G"])
        assert err < 1e-6, f"step {step}: teacher gradient rel. error {err:.2e}"
        assert _rel(list(s.parameters()), list(s2.parameters())) < 1e-10


def test_influence_scale_multiplies_the_influence_term_exactly():
    """G(k) = G(0) + k (G(1) - G(0)) for the teacher gradient (float64), influence x k."""
    grads, infl = {}, {}
    for k in (0.0, 1.0, 3.0):
        t, s, to, so = _pair()
        d = Distiller(
            "lgtm",
            teacher=t,
            student=s,
            teacher_optimizer=to,
            student_optimizer=so,
            influence_scale=k,
        )
        rec = _capture_grads(to, list(t.parameters()))
        m = d.method.teacher_update([random_batch(9, 1)], [random_batch(7, 2)])
        grads[k], infl[k] = _flat(rec[-1]), m["influence"]
    h = grads[1.0] - grads[0.0]
    assert float(h.norm()) > 1e-12 * float(grads[0.0].norm())  # the term is there
    err = float((grads[3.0] - grads[0.0] - 3 * h).norm() / (3 * h).norm())
    assert err < 1e-10, f"influence_scale=3: influence term rel. error {err:.2e}"
    assert torch.equal(infl[0.0], torch.zeros_like(infl[0.0]))
    assert torch.allclose(infl[3.0], 3 * infl[1.0], rtol=1e-12, atol=0)


class _ReadsAChildsWeight(torch.nn.Module):
    """A model whose forward reads a child's parameter outside the child's own forward."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.extra = torch.nn.Linear(4, 3)

    def forward(self, **kw):
        logits = get_logits(self.inner(**kw))
        return logits + self.extra.weight.sum()  # read here, not in extra's forward


@pytest.mark.parametrize("kind", ["classifier", "gpt2", "gpt2-fused", "llama-fused", "external"])
def test_forward_perturbed_forms_parameters_per_module_and_equals_full_work_tensors(kind):
    """Step D's ``Engine.forward_perturbed`` (theta + a v formed module by module, no full work
    copy) equals ``forward_at`` on the full ``theta + a v`` bit for bit, with dropout (the same
    RNG state), tied embeddings and the fused head; a model that reads a parameter outside its
    module's forward is detected and runs on full work tensors, still equal."""
    from ..helpers import lm_batch, tiny_decoder

    torch.manual_seed(0)
    fused = kind.endswith("fused")
    if kind in ("classifier", "external"):
        model, batch = tiny_model(seed=4), random_batch(5, 3)
        model.train()  # dropout on
        if kind == "external":
            model = _ReadsAChildsWeight(model)
    else:
        model = tiny_decoder("tiny" if kind.startswith("llama") else "gpt2-student", 5)
        batch = {k: v for k, v in lm_batch(3, 4).items() if k != "labels"}
    engine = TorchEngine(model, build_adamw(model, 1e-3, 0.0))
    engine.fused_head = fused
    theta = engine.master_params()
    g = torch.Generator().manual_seed(1)
    v = [torch.randn(t.shape, generator=g) for t in theta]
    for alpha in (1e-2, -1e-2):
        rng = torch.get_rng_state()
        got = engine.forward_perturbed(theta, v, alpha, batch)
        torch.set_rng_state(rng)
        want = engine.forward_at([torch.add(t, d, alpha=alpha) for t, d in zip(theta, v)], batch)
        if fused:
            got, want = got.full_logits(), want.full_logits()
        assert torch.equal(got, want), kind
    assert engine._perturb_lazily is (kind != "external")
    assert all(p is q for p, q in zip(engine.params(), model.parameters()))  # put back


def test_student_only_is_the_students_task_loss_and_never_runs_the_teacher():
    """One student_only step == one AdamW step on the student's CE (float64); the teacher is
    never called and keeps its weights."""
    b = random_batch(8, 1)
    t, s, to, so = _pair()
    s_ref, so_ref = copy.deepcopy((s, so))
    t0 = [p.detach().clone() for p in t.parameters()]

    def no_teacher(*a, **k):
        raise AssertionError("the teacher ran")

    d = Distiller("student_only", teacher=t, student=s, teacher_optimizer=to, student_optimizer=so)
    t.forward = no_teacher
    m = d.step(b, None)
    logits = s_ref(**model_inputs(b)).logits
    loss = torch.nn.functional.cross_entropy(logits, b["labels"])
    loss.backward()
    so_ref.step()
    assert m["student_loss"] == pytest.approx(loss.item(), rel=1e-12)
    assert _rel(list(s.parameters()), list(s_ref.parameters())) < 1e-12
    assert all(torch.equal(a, p) for a, p in zip(t0, t.parameters()))
