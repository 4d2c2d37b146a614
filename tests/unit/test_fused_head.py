"""The fused head (``model.fused_head``): decoders' losses, the LGTM teacher gradient and the
evaluation from hidden states through the output layer, chunk by chunk, never the full logits.
The chunked path equals the full-logits path after 3 steps (float64, every method it serves,
the divergences, accumulation with unequal micro-batches, tied and untied output layers, chunks
that split sequences); models whose logits are not their output layer fall back; a memory probe
catches a full ``[tokens, vocab]`` tensor coming back."""

import pytest
import torch

from lgtm_ds import Distiller
from lgtm_ds.engines.head import FullLogitsWarning, HeadOutput
from lgtm_ds.tasks import get_task

from ..helpers import LM_VOCAB, lm_batch, make_distiller, tiny_decoder

PAIRS = {"gpt2": ("gpt2-teacher", "gpt2-student"), "llama": ("tiny", "tiny")}
HP = {
    "kl": dict(alpha_teacher=0.4, alpha_student=0.8),
    "jsd-T2": dict(
        alpha_student=0.6,
        alpha_teacher=0.5,
        jsd_beta=0.5,
        teacher_jsd_beta=1.0,
        temperature=2.0,
        scale_by_t2=True,
    ),
}


def _run(method, fused, pair, hp, gas=1, chunk=None, ratio=False):
    t_name, s_name = PAIRS[pair]
    t = tiny_decoder(t_name, 1, torch.float64, LM_VOCAB)
    s = tiny_decoder(s_name, 2, torch.float64, LM_VOCAB)
    d = make_distiller(
        method,
        t,
        s,
        lrs=(3e-3, 5e-3),
        wd=0.01,
        task=get_task("causal_lm")(head_chunk=chunk),
        fused_head=fused,
        gradient_accumulation_steps=gas,
        **hp,
    )
    metrics = []
    for step in range(3):
        b, q = lm_batch(6, 100 + step), lm_batch(3, 200 + step)
        if gas == 2:  # unequal token counts per micro-batch
            b = [{k: v[:2] for k, v in b.items()}, {k: v[2:] for k, v in b.items()}]
        metrics.append(d.step(b, q, influence_ratio=ratio))
    return t, s, metrics


def _rel(a, b):
    num = sum(float((x - y).detach().norm() ** 2) for x, y in zip(a, b)) ** 0.5
    return num / sum(float(y.detach().norm() ** 2) for y in b) ** 0.5


@pytest.mark.slow  # the fast lane (tests/unit -m 'not slow') leaves it out
@pytest.mark.parametrize(
    "method,pair,hp,gas,chunk",
    [
        ("lgtm", "gpt2", "kl", 1, None),
        ("lgtm", "gpt2", "jsd-T2", 2, 3),
        ("lgtm", "llama", "kl", 2, 5),
        ("online_kd", "gpt2", "kl", 2, 3),
        ("vanilla_kd", "llama", "jsd-T2", 1, 4),
    ],
)
def test_fused_head_equals_full_logits_after_3_steps_fp64(method, pair, hp, gas, chunk):
    full = _run(method, False, pair, HP[hp], gas)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(HeadOutput, "full_logits", _boom)
        fused = _run(method, True, pair, HP[hp], gas, chunk)
    for k, role in enumerate(("teacher", "student")):
        err = _rel(list(fused[k].parameters()), list(full[k].parameters()))
        assert err < 1e-12, f"{role}: {err:.2e}"
    for mf, mr in zip(fused[2], full[2]):
        for key in ("student_loss", "teacher_loss", "quiz_ce_lookahead", "v_norm"):
            if key in mr:
                assert mf[key] == pytest.approx(mr[key], rel=1e-10), key
        if "influence" in mr:
            err = float((mf["influence"] - mr["influence"]).norm() / mr["influence"].norm())
            assert err < 1e-10 and mf["influence"].shape == (6,)


def _boom(self):
    raise AssertionError("full logits formed on the fused-head path")


@pytest.mark.slow  # the fast lane (tests/unit -m 'not slow') leaves it out
def test_influence_ratio_probe_and_example_stats_on_the_fused_head():
    full = _run("lgtm", False, "gpt2", HP["kl"], 2, ratio=True)
    fused = _run("lgtm", True, "gpt2", HP["kl"], 2, chunk=4, ratio=True)
    for mf, mr in zip(fused[2], full[2]):
        assert mf["influence_ratio"] == pytest.approx(mr["influence_ratio"], rel=1e-9)
    assert _rel(list(fused[0].parameters()), list(full[0].parameters())) < 1e-12


def test_eval_rows_and_example_stat_match_full_logits():
    task = get_task("causal_lm")(head_chunk=3)
    task.vocab_size = LM_VOCAB
    t, s = tiny_decoder("teacher", 1, torch.float64), tiny_decoder("gpt2-student", 2, torch.float64)
    b = lm_batch(5, 7)
    inputs = {k: v for k, v in b.items() if k != "labels"}
    from lgtm_ds.engines.head import head_mode

    with torch.no_grad():
        full = {"teacher": t(**inputs).logits, "student": s(**inputs).logits}
        heads = {}
        for role, m in (("teacher", t), ("student", s)):
            with head_mode(m):
                heads[role] = m(**inputs)
    a, f = task.eval_rows(full, b), task.eval_rows(heads, b)
    assert a.keys() == f.keys() == {"teacher", "student", "agreement", "kl"}
    for k in a:
        assert abs(a[k] - f[k]).max() < 1e-10, k
    for role in ("teacher", "student"):
        ref = task.example_stat(full[role], b["labels"])
        assert torch.allclose(task.example_stat(heads[role], b["labels"]), ref, rtol=1e-6)


def test_models_whose_logits_are_not_their_output_layer_fall_back():
    task = get_task("causal_lm")()
    m = tiny_decoder("tiny", 0)
    assert task.head_matches(m) is None
    m.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in task.head_matches(m)
    m.config.final_logit_softcapping = None
    orig = type(m).forward

    def scaled(self, *a, **k):  # e.g. a model that scales its logits in forward
        out = orig(self, *a, **k)
        out.logits = out.logits * 2
        return out

    m.forward = scaled.__get__(m)
    assert "differ" in task.head_matches(m)
    with pytest.warns(FullLogitsWarning, match="student uses full logits.*its logits differ"):
        d = Distiller("lgtm", teacher=tiny_decoder("tiny", 1), student=m, task=task)
    assert d.teacher.fused_head and not d.student.fused_head and "student" in d.full_logits


def _head(g, B, L, H, V, bias):
    """A HeadOutput of random float64 hidden states / output layer (V + 3 model rows: the cut)."""
    b = torch.randn(V + 3, generator=g, dtype=torch.float64) if bias else None
    return HeadOutput(
        torch.randn(B, L, H, generator=g, dtype=torch.float64),
        torch.randn(V + 3, H, generator=g, dtype=torch.float64) * 0.5,
        b,
    )


def _as_tensors(x):
    from lgtm_ds.engines.head import HeadGrad

    if isinstance(x, HeadGrad):
        return [x.hidden, x.weight] + ([x.bias] if x.bias is not None else [])
    return [x]


@pytest.mark.slow  # the fast lane (tests/unit -m 'not slow') leaves it out
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("hp", ["kl", "jsd-T2"])
@pytest.mark.parametrize("fused", [True, False])
def test_teacher_pass_equals_its_parts(split, hp, fused):
    """``CausalLMTask.lgtm_teacher_pass`` (one chunked pass: dL/dz, the split influence term,
    the influence, L_t) equals the three separate calls it replaces (``Task``'s composition:
    ``lgtm_logit_grad``, ``influence_logit_term``, ``distill_loss``): float64, fresh random
    inputs, a chunk that splits sequences, the vocabulary cut, on the fused head and on full
    logits; and a micro-batch without a valid token."""
    from lgtm_ds.tasks.base import InfluenceParams, Task

    g = torch.Generator().manual_seed(7 + split + 2 * fused)
    B, L, H, V = 3, 13, 6, LM_VOCAB
    task = get_task("causal_lm")(head_chunk=5)
    task.vocab_size = V
    h = HP[hp]
    p = InfluenceParams(
        h["alpha_teacher"], h.get("temperature", 1.0), 3e-3, 0.05, h.get("scale_by_t2", False),
        beta_teacher=h.get("teacher_jsd_beta", 0.0), beta_student=h.get("jsd_beta", 0.0),
    )  # fmt: skip
    sides = [_head(g, B, L, H, V, bias=i % 2 == 0) for i in range(4)]
    if not fused:
        sides = [x.full_logits() for x in sides]
    labels = lm_batch(B, 11)["labels"][:, :L]
    got = task.lgtm_teacher_pass(*sides, labels, p, split=split)
    ref = Task.lgtm_teacher_pass(task, *sides, labels, p, split=split)
    assert float(got.loss) == pytest.approx(float(ref.loss), rel=1e-12)
    torch.testing.assert_close(got.influence, ref.influence, rtol=1e-9, atol=1e-15)
    assert got.influence.abs().min() > 0
    pairs = [(got.grad, ref.grad)] + ([(got.term, ref.term)] if split else [])
    for a, b in pairs:
        for x, y in zip(_as_tensors(a), _as_tensors(b), strict=True):
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-15 * float(y.abs().max()))
    assert (got.term is None) == (not split)
    if split:  # the main part: bitwise the eta = 0 gradient
        import dataclasses

        main, _ = task.lgtm_logit_grad(*sides, labels, dataclasses.replace(p, eta=0.0))
        for x, y in zip(_as_tensors(got.grad), _as_tensors(main)):
            assert torch.equal(x, y)
    none = torch.full_like(labels, -100)
    empty = task.lgtm_teacher_pass(*sides, none, p, split=split)
    assert float(empty.loss) == 0 and empty.influence.abs().max() == 0
    for part in [empty.grad] + ([empty.term] if split else []):
        assert all(float(x.abs().max()) == 0 for x in _as_tensors(part))
