"""Hidden-state distillation: the term vs a direct torch computation (float64, with and without
projection, mse / cosine, all positions / the first), the gradient reaching both models where
both learn (online KD, LGTM's teacher), the layer map, the saved student without projections."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

from lgtm_ds import ConfigError, Distiller
from lgtm_ds.config import load_config
from lgtm_ds.engines.optim import build_adamw
from lgtm_ds.methods.hidden import HIDDEN_PROJ, HiddenSpec, layer_pairs, parse_layers
from lgtm_ds.tasks.hf import embedded_bert_config

from ..helpers import LABELS, VOCAB, capture_grads, random_batch


def _bert(size, seed, **over):
    torch.manual_seed(seed)
    cfg = embedded_bert_config(size, vocab_size=VOCAB, num_labels=LABELS, dropout=0.0)
    for k, v in over.items():
        setattr(cfg, k, v)
    m = AutoModelForSequenceClassification.from_config(cfg, attn_implementation="eager")
    torch.nn.init.normal_(m.classifier.weight, std=0.3)
    return m.double()


def _models(same_width: bool):
    t = _bert("tiny", 1, num_hidden_layers=4)
    s = _bert("tiny", 2, num_hidden_layers=2)
    if not same_width:
        s = _bert(
            "tiny",
            2,
            num_hidden_layers=2,
            hidden_size=24,
            intermediate_size=48,
            num_attention_heads=2,
        )
    return t, s


def _rel(got, want) -> float:
    """Relative error over all tensors at once (key biases have ~1e-21 gradients: noise)."""
    flat = lambda ts: torch.cat([x.reshape(-1) for x in ts])  # noqa: E731
    return float((flat(got) - flat(want)).norm() / flat(want).norm())


def _inputs(b):
    return {k: v for k, v in b.items() if k != "labels"}


def _direct_h(t, s, b, pairs, proj, kind, positions):
    """H from Hugging Face's hidden_states (hidden_states[i] = block i's output)."""
    ht = t(**_inputs(b), output_hidden_states=True).hidden_states
    hs = s(**_inputs(b), output_hidden_states=True).hidden_states
    mask = b["attention_mask"].double()
    total = 0
    for k, (i, j) in enumerate(pairs):
        a, c = hs[i], ht[j]
        if proj is not None:
            a = proj[k](a)
        if positions == "first":
            a, c, m = a[:, :1], c[:, :1], torch.ones_like(mask[:, :1])
        else:
            m = mask
        per = (a - c).pow(2).mean(-1) if kind == "mse" else 1 - F.cosine_similarity(a, c, dim=-1)
        total = total + (per * m).sum() / m.sum()
    return total / len(pairs)


@pytest.mark.parametrize(
    "same_width,kind,positions,layers",
    [
        (True, "mse", "all", None),
        (False, "mse", "all", None),
        (False, "cosine", "first", ["2:3"]),
        (True, "cosine", "all", ["1:4", "2:1"]),
    ],
)
def test_student_gradient_is_that_of_the_direct_term(same_width, kind, positions, layers):
    """Vanilla KD, weight 0.7: the student's (and projection's) gradient equals autograd of
    L_s + 0.7 H computed from Hugging Face's output_hidden_states (float64)."""
    t, s = _models(same_width)
    opt = build_adamw(s, 1e-3, 0.0)
    d = Distiller(
        "vanilla_kd",
        teacher=t,
        student=s,
        student_optimizer=opt,
        hidden_weight=0.7,
        hidden_layers=layers,
        hidden_loss=kind,
        hidden_positions=positions,
    )
    proj = getattr(s, HIDDEN_PROJ, None)
    assert (proj is None) == same_width
    pairs = layer_pairs(HiddenSpec(0.7, layers), t, s)
    if layers is None:
        assert pairs == [(1, 2), (2, 4)]  # the skip map
    b = random_batch(6, 3)
    s_ref = copy.deepcopy(s)  # the projection comes with it
    params = [p for p in s.parameters()]
    rec = capture_grads(opt, params)
    m = d.step(b)
    t.eval()
    ref_params = list(s_ref.parameters())
    with torch.no_grad():
        z = t(**_inputs(b)).logits
    ls = d.student_loss(s_ref(**_inputs(b)).logits, z, b["labels"])
    h = _direct_h(t, s_ref, b, pairs, getattr(s_ref, HIDDEN_PROJ, None), kind, positions)
    want = torch.autograd.grad(ls + 0.7 * h, ref_params)
    assert _rel(rec[-1], want) < 1e-10
    assert m["student_hidden_loss"] == pytest.approx(float(0.7 * h.detach()), rel=1e-10)
    if proj is not None:  # the projection learns (its gradient is in the optimizer's step)
        ids = {id(p) for p in proj.parameters()}
        got = [g for p, g in zip(params, rec[-1]) if id(p) in ids]
        assert len(got) == 2 * len(pairs) and all(g.norm() > 0 for g in got)


@pytest.mark.slow  # the fast lane (tests/unit -m 'not slow') leaves it out
def test_online_kd_teacher_gets_the_term_too():
    t, s = _models(same_width=False)
    to, so = build_adamw(t, 1e-3, 0.0), build_adamw(s, 1e-3, 0.0)
    d = Distiller(
        "online_kd",
        teacher=t,
        student=s,
        teacher_optimizer=to,
        student_optimizer=so,
        hidden_weight=0.5,
    )
    t_ref, s_ref = copy.deepcopy(t), copy.deepcopy(s)
    rec = capture_grads(to, list(t.parameters()))
    b = random_batch(6, 4)
    m = d.step(b)
    with torch.no_grad():
        sz = s_ref(**_inputs(b)).logits
    lt = d.teacher_loss(t_ref(**_inputs(b)).logits, sz, b["labels"])
    pairs = [(1, 2), (2, 4)]
    # the student's projected states are the target: no gradient to them here
    h = _direct_h(t_ref, s_ref, b, pairs, getattr(s_ref, HIDDEN_PROJ), "mse", "all")
    want = torch.autograd.grad(lt + 0.5 * h, list(t_ref.parameters()))
    assert _rel(rec[-1], want) < 1e-10
    assert m["teacher_hidden_loss"] > 0 and m["student_hidden_loss"] > 0


@pytest.mark.slow  # the fast lane (tests/unit -m 'not slow') leaves it out
@pytest.mark.parametrize("n_micro", [1, 2])
def test_lgtm_teacher_gets_the_term(n_micro):
    """influence_scale 0: LGTM's teacher gradient is grad(L_t + w H_t) at the step's start
    (step A's graph kept with one micro-batch; a new forward per micro-batch with two)."""
    t, s = _models(same_width=False)
    to, so = build_adamw(t, 1e-3, 0.0), build_adamw(s, 1e-3, 0.0)
    d = Distiller(
        "lgtm",
        teacher=t,
        student=s,
        teacher_optimizer=to,
        student_optimizer=so,
        hidden_weight=0.5,
        influence_scale=0.0,
        gradient_accumulation_steps=n_micro,
    )
    t_ref, s_ref = copy.deepcopy(t), copy.deepcopy(s)
    rec = capture_grads(to, list(t.parameters()))
    micro = [random_batch(6, 5 + j) for j in range(n_micro)]
    d.step(micro, [random_batch(5, 9 + j) for j in range(n_micro)])
    want = None
    for b in micro:
        with torch.no_grad():
            sz = s_ref(**_inputs(b)).logits
        lt = d.teacher_loss(t_ref(**_inputs(b)).logits, sz, b["labels"])
        h = _direct_h(t_ref, s_ref, b, [(1, 2), (2, 4)], getattr(s_ref, HIDDEN_PROJ), "mse", "all")
        g = torch.autograd.grad((lt + 0.5 * h) / n_micro, list(t_ref.parameters()))
        want = g if want is None else [a + c for a, c in zip(want, g)]
    assert _rel(rec[-1], want) < 1e-10


def test_layer_map_errors():
    assert parse_layers(["1:2", " 2:4"]) == [(1, 2), (2, 4)]
    for bad in (["1-2"], ["0:1"], ["1:2", "1:3"], [], ["a:b"]):
        with pytest.raises(ConfigError, match="method.hidden_layers"):
            parse_layers(bad)
    t, s = _models(same_width=True)
    with pytest.raises(ConfigError, match="the student has 2 blocks, the teacher 4"):
        layer_pairs(HiddenSpec(1.0, ("3:1",)), t, s)
    with pytest.raises(ConfigError, match="method.hidden_layers"):
        load_config(None, ["method.hidden_layers=[1:x]"])
    with pytest.raises(ConfigError, match="hidden_positions=first"):
        load_config(
            "configs/examples/causal_lm_tiny.yaml",
            ["method.hidden_weight=1", "method.hidden_positions=first"],
        )
