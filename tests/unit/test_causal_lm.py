"""Token-level LGTM on decoders (docs/algorithm.md, "Token level"): the cheap form == the reference
form in float64 with GPT-2 blocks, the global valid-token normaliser (micro 8 x 1 == 4 x 2 with
unequal lengths), the divergences, the vocabulary rules and the evaluation metrics."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from lgtm_ds import ConfigError, Distiller
from lgtm_ds.engines.optim import build_adamw
from lgtm_ds.errors import ModelError
from lgtm_ds.methods.naive import naive_lgtm_step
from lgtm_ds.tasks import get_task
from lgtm_ds.tasks.base import ModelOptions

from ..helpers import LM_VOCAB, lm_batch, make_distiller, tiny_decoder
from .test_algorithm import _capture_grads as _capture
from .test_algorithm import _rel

VOCAB = LM_VOCAB


def lm_task():
    return get_task("causal_lm")()


def decoder(name, seed, dtype=torch.float64, vocab=VOCAB):
    return tiny_decoder(name, seed, dtype, vocab)


def _pair(lr_t=3e-3, lr_s=5e-3):
    t, s = decoder("gpt2-teacher", 1), decoder("gpt2-student", 2)
    return t, s, build_adamw(t, lr_t, 0.01), build_adamw(s, lr_s, 0.01)


@pytest.mark.parametrize(
    "hp",
    [
        dict(alpha_student=0.8, alpha_teacher=0.4, temperature=1.0),
        pytest.param(
            dict(alpha_student=0.5, alpha_teacher=0.7, temperature=2.0, scale_by_t2=True),
            marks=pytest.mark.slow,
        ),
        pytest.param(
            dict(alpha_student=0.6, alpha_teacher=0.5, jsd_beta=0.5, teacher_jsd_beta=1.0),
            marks=pytest.mark.slow,
        ),
    ],
    ids=["kl", "kl-T2", "jsd-reverse"],
)
def test_token_level_cheap_form_matches_reference_fp64(hp):
    """Teacher update and per-sequence influence of the cheap form vs the naive form (deep
    copies, three teacher backward passes), 3 steps, float64, GPT-2 blocks."""
    t, s, to, so = _pair()
    t2, s2, to2, so2 = copy.deepcopy((t, s, to, so))
    task = lm_task()
    d = Distiller(
        "lgtm", teacher=t, student=s, teacher_optimizer=to, student_optimizer=so, task=task, **hp
    )
    cheap = _capture(to, list(t.parameters()))
    for step in range(3):
        b, q = lm_batch(5, 100 + step), lm_batch(3, 200 + step)
        m = d.step(b, q)
        ref = naive_lgtm_step(t2, s2, to2, so2, b, q, task=task, **hp)
        err = _rel(cheap[-1], ref["G"])
        assert err < 1e-6, f"step {step}: teacher gradient relative error {err:.2e}"
        assert m["fd_R"] == pytest.approx(ref["fd_R"], rel=1e-9)
        infl_err = float((m["influence"] - ref["influence"]).norm() / ref["influence"].norm())
        assert infl_err < 1e-6, f"step {step}: influence relative error {infl_err:.2e}"
        assert m["influence"].shape == (5,)
        assert _rel(list(s.parameters()), list(s2.parameters())) < 1e-9


@pytest.mark.slow  # the fast lane (tests/unit -m 'not slow') leaves it out
@pytest.mark.parametrize("method", ["lgtm", "online_kd", "vanilla_kd"])
def test_micro_8x1_equals_4x2_with_unequal_lengths(method):
    """The global valid-token count: two micro-batches with different token counts, accumulated,
    equal one micro-batch of both (float64, plain modules)."""
    runs = []
    for gas in (1, 2):
        t, s, to, so = _pair()
        d = Distiller(
            method,
            teacher=t,
            student=s,
            teacher_optimizer=to,
            student_optimizer=so,
            task=lm_task(),
            gradient_accumulation_steps=gas,
            alpha_student=0.7,
        )
        for step in range(3):
            b, q = lm_batch(8, 300 + step), lm_batch(4, 400 + step)
            split = lambda x: [{k: v[i * 4 : (i + 1) * 4] for k, v in x.items()} for i in range(2)]  # noqa: E731
            bb = b if gas == 1 else split(b)
            qq = q if gas == 1 else [q]
            if method == "vanilla_kd":
                d.teacher_finetune_step(bb)
            d.step(bb, qq if method == "lgtm" else None)
        runs.append((list(t.parameters()), list(s.parameters())))
    labels = lm_batch(8, 300)["labels"]
    counts = [int((labels[i * 4 : (i + 1) * 4, 1:] != -100).sum()) for i in (0, 1)]
    assert counts[0] != counts[1]  # the case the normaliser is for
    for role in (0, 1):
        err = _rel(runs[1][role], runs[0][role])
        assert err < 1e-12, f"{method} role {role}: {err:.2e}"


def test_rows_ignore_prompt_and_padding_and_shift():
    task = lm_task()
    b = lm_batch(4, 7)
    logits = torch.randn(4, 13, VOCAB, dtype=torch.float64)
    rows, y, mask = task.rows(logits, b["labels"])
    assert rows.shape == (task.count_rows(b), VOCAB) and (y >= 0).all()
    # row k is position t of sequence i predicting labels[i, t + 1]
    i, t = mask.nonzero()[0].tolist()
    assert torch.equal(rows[0], logits[i, t]) and y[0] == b["labels"][i, t + 1]
    ce = task.task_loss(logits, b["labels"])
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), b["labels"][:, 1:].reshape(-1))
    assert float(ce) == pytest.approx(float(ref), rel=1e-12)


def test_logit_gradient_is_zero_at_ignored_positions():
    task = lm_task()
    b = lm_batch(3, 9)
    z, s, sp, sm = (torch.randn(3, 13, VOCAB, dtype=torch.float64) for _ in range(4))
    from lgtm_ds.tasks.base import InfluenceParams

    g, infl = task.lgtm_logit_grad(z, s, sp, sm, b["labels"], InfluenceParams(0.4, 1.0, 1e-3, 0.1))
    ignored = torch.ones(3, 13, dtype=torch.bool)
    ignored[:, :-1] = b["labels"][:, 1:] == -100
    assert g[ignored].abs().max() == 0 and g[~ignored].abs().min() > 0
    assert infl.shape == (3,)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_divergences_match_their_definition(beta):
    task = lm_task()
    x, t = torch.randn(6, VOCAB), torch.randn(6, VOCAB)
    got = task.kd_per_row(x, t, 2.0, beta)
    ref = task.kd_per_row(x.double(), t.double(), 2.0, beta)
    log_q, log_p = F.log_softmax(x.double() / 2, -1), F.log_softmax(t.double() / 2, -1)
    if beta == 0:
        expect = (log_p.exp() * (log_p - log_q)).sum(-1)
    elif beta == 1:
        expect = (log_q.exp() * (log_q - log_p)).sum(-1)
    else:
        m = (beta * log_p.exp() + (1 - beta) * log_q.exp()).log()
        expect = beta * (log_p.exp() * (log_p - m)).sum(-1) + (1 - beta) * (
            log_q.exp() * (log_q - m)
        ).sum(-1)
    torch.testing.assert_close(ref, expect, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.double(), expect, rtol=1e-5, atol=1e-6)


def test_beta_out_of_range_is_refused():
    t, s, to, so = _pair()
    with pytest.raises(ConfigError, match="jsd_beta must be in"):
        Distiller(
            "lgtm",
            teacher=t,
            student=s,
            teacher_optimizer=to,
            student_optimizer=so,
            task=lm_task(),
            jsd_beta=1.5,
        )


def test_padded_teacher_vocabulary_is_cut_to_the_shared_size():
    task = lm_task()
    opts = ModelOptions(vocab_size=VOCAB, dropout=0.0)
    t = task.build_model("embedded:tiny", role="teacher", options=opts)
    s = task.build_model("embedded:tiny", role="student", options=opts)
    t.resize_token_embeddings(VOCAB + 11)  # e.g. 152064 rows for a 151936-token tokenizer
    task.check_pair(t, s, "big", "small")
    assert task.vocab_size == VOCAB
    b = lm_batch(2, 3)
    zt = t(input_ids=b["input_ids"]).logits
    zs = s(input_ids=b["input_ids"]).logits
    assert zt.shape[-1] == VOCAB + 11
    loss = task.distill_loss(zs, zt, b["labels"], alpha=0.5, temperature=1.0)
    assert torch.isfinite(loss)


def test_vocabulary_smaller_than_the_tokenizer_is_one_clear_error():
    task = lm_task()
    opts = ModelOptions(vocab_size=VOCAB, dropout=0.0)
    t = task.build_model("embedded:tiny", role="teacher", options=opts)
    s = task.build_model("embedded:tiny", role="student", options=opts)
    s.resize_token_embeddings(VOCAB - 5)
    with pytest.raises(ModelError, match=r"teacher 'T'.*53.*student 'S'.*48.*tokenizer has 53"):
        task.check_pair(t, s, "T", "S")


def test_eval_metrics_are_token_weighted():
    task = lm_task()
    b = lm_batch(4, 11)
    zt, zs = torch.randn(4, 13, VOCAB), torch.randn(4, 13, VOCAB)
    rows = task.eval_rows({"teacher": zt, "student": zs}, b)
    res = task.score(rows, None)
    rs, y, _ = task.rows(zs, b["labels"])
    ce = float(F.cross_entropy(rs.double(), y))
    assert res["student/ce"] == pytest.approx(ce, rel=1e-6)
    assert res["student/perplexity"] == pytest.approx(math.exp(ce), rel=1e-6)
    rt, _, _ = task.rows(zt, b["labels"])
    agree = float((rt.argmax(-1) == rs.argmax(-1)).double().mean())
    assert res["agreement/top1"] == pytest.approx(agree)
    assert task.primary_metric == "perplexity" and "perplexity" in task.lower_is_better


def test_eval_kl_is_the_token_weighted_teacher_student_kl():
    """``agreement/kl`` against a float64 reference, over sequences of odd, unequal lengths; and
    not fooled where top-1 agreement is: two models with the same argmax everywhere but
    different distributions agree 100% and have a KL well above 0."""
    task = lm_task()
    b = lm_batch(3, 7, length=11)  # unequal lengths, prompts masked
    zt, zs = torch.randn(3, 11, VOCAB), torch.randn(3, 11, VOCAB)
    res = task.score(task.eval_rows({"teacher": zt, "student": zs}, b), None)
    rt, _, _ = task.rows(zt, b["labels"])
    rs, _, _ = task.rows(zs, b["labels"])
    lt, ls = rt.double().log_softmax(-1), rs.double().log_softmax(-1)
    ref = float((lt.exp() * (lt - ls)).sum(-1).mean())
    assert res["agreement/kl"] == pytest.approx(ref, rel=1e-5)
    same = task.score(task.eval_rows({"teacher": zt, "student": zt.clone()}, b), None)
    assert same["agreement/kl"] == pytest.approx(0.0, abs=1e-6)
    # both models emit one token (index 3) everywhere, with different spreads over the rest
    peak_t, peak_s = torch.randn(3, 11, VOCAB), 3 * torch.randn(3, 11, VOCAB)
    peak_t[..., 3], peak_s[..., 3] = 6.0, 18.0
    one = task.score(task.eval_rows({"teacher": peak_t, "student": peak_s}, b), None)
    assert one["agreement/top1"] == 1.0 and one["agreement/kl"] > 0.1


def test_classifier_checkpoint_for_a_decoder_task_and_the_reverse(tmp_path):
    from transformers import AutoModelForCausalLM

    from ..helpers import tiny_model

    tiny_model().save_pretrained(tmp_path / "cls")
    with pytest.raises(ModelError, match="not a causal LM.*data.task_type"):
        lm_task().build_model(str(tmp_path / "cls"), role="teacher", options=ModelOptions(61))
    AutoModelForCausalLM.from_config(decoder("tiny", 0).config).save_pretrained(tmp_path / "lm")
    cls = get_task("classification")(num_labels=2)
    with pytest.raises(ModelError, match="is a causal LM.*data.task_type=causal_lm"):
        cls.build_model(str(tmp_path / "lm"), role="student", options=ModelOptions(VOCAB))


@pytest.mark.slow  # the fast lane (tests/unit -m 'not slow') leaves it out
def test_distiller_takes_a_decoder_batch_unchanged():
    """No task given: labels [B, L] make it a causal-LM run (same updates as task="causal_lm")."""
    runs = []
    for task in (None, "causal_lm"):
        t, s, to, so = _pair()
        d = Distiller(
            "lgtm", teacher=t, student=s, teacher_optimizer=to, student_optimizer=so, task=task
        )
        d.step(lm_batch(4, 1), lm_batch(3, 2))
        assert d.task.name == "causal_lm"
        runs.append(list(t.parameters()) + list(s.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_row_weights_are_exactly_one_for_equal_classification_micro_batches():
    """Classifier micro-batches of equal size: the global-row weighting multiplies by nothing."""
    from ..helpers import random_batch, tiny_model

    t, s = tiny_model(seed=1), tiny_model(seed=2)
    d = make_distiller("online_kd", t, s, gradient_accumulation_steps=3)
    micro = [random_batch(5, i) for i in range(3)]
    quiz = [random_batch(7, 10 + i) for i in range(2)]
    w, wq = d.method.row_weights(micro, quiz)
    assert w == [1.0, 1.0, 1.0] and wq == [1.0, 1.0]
    lm = [lm_batch(4, i) for i in range(2)]
    d.task = lm_task()
    (w,) = d.method.row_weights(lm)
    counts = [lm_task().count_rows(b) for b in lm]
    assert w == pytest.approx([2 * c / sum(counts) for c in counts]) and w[0] != w[1]


def test_max_length_beyond_learned_positions_is_one_error():
    task = lm_task()
    task.max_length = 600  # as encode() records it
    t, s = decoder("gpt2-teacher", 0), decoder("gpt2-student", 1)  # 512 learned positions
    with pytest.raises(ModelError, match="512 learned positions.*data.max_length is 600"):
        task.check_pair(t, s, "T", "S")


def test_a_decoder_task_with_its_own_loss_is_refused_by_lgtm_not_ignored():
    """The token-level LGTM teacher gradient has the next-token CE in closed form: a subclass
    whose task_loss differs gets one clear error when the LGTM Distiller is built (online KD
    still runs on it); declaring ``task_loss_closed_form`` says the CE is unchanged: it runs."""

    class Smoothed(type(lm_task())):
        def task_loss(self, logits, labels):
            return super().task_loss(logits, labels) * 1.0  # stands for a user's own loss

    t, s, to, so = _pair()
    b, q = lm_batch(3, 1), lm_batch(3, 2)
    with pytest.raises(NotImplementedError, match="Smoothed overrides task_loss"):
        Distiller(
            "lgtm",
            teacher=t,
            student=s,
            teacher_optimizer=to,
            student_optimizer=so,
            task=Smoothed(),
        )
    Distiller("online_kd", teacher=t, student=s, teacher_optimizer=to, student_optimizer=so,
              task=Smoothed()).step(b)  # fmt: skip
    Smoothed.task_loss_closed_form = True
    m = Distiller("lgtm", teacher=t, student=s, teacher_optimizer=to, student_optimizer=so,
                  task=Smoothed()).step(b, q)  # fmt: skip
    assert torch.isfinite(m["influence"]).all()
