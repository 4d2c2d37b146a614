"""On-policy distillation (method.lmbda, method.seq_kd; lgtm_ds/methods/onpolicy.py,
lgtm_ds/tasks/rollout.py): the keys and their errors, the generated training batch against a
hand-written greedy loop, the mask, the objective on sampled steps, seeded sampling that leaves
training's RNG alone, eval mode and checkpointing restored, lmbda = 0 bit for bit, and an exact
in-process resume. The trainer's resume from a checkpoint: tests/integration/test_onpolicy.py."""

import copy

import pytest
import torch

from lgtm_ds import ConfigError, DataError, Distiller
from lgtm_ds.config import load_config
from lgtm_ds.engines.base import TorchEngine
from lgtm_ds.tasks.rollout import (
    IGNORE,
    GenerationSettings,
    HFGenerator,
    batch_prompts,
    check_prompt_room,
    generation_mode,
)

from ..helpers import LM_VOCAB, lm_batch, make_distiller, tiny_decoder

PAD = 0


class Tok:
    """The tokenizer's part on-policy steps use: pad and EOS ids, its length."""

    name_or_path = "stub"
    pad_token_id = PAD

    def __init__(self, eos: int | None):
        self.eos_token_id = eos

    def __len__(self):
        return LM_VOCAB


def _pair(seed=0):
    return tiny_decoder("gpt2-teacher", seed=seed), tiny_decoder("gpt2-student", seed=seed + 1)


def _greedy_eos(model, prompt) -> int:
    """A token the model emits greedily right after ``prompt``: as EOS, some rows stop early."""
    with torch.no_grad():
        return int(model(input_ids=torch.tensor([prompt])).logits[0, -1].argmax())


def _greedy_by_hand(model, prompt, eos, n_new):
    """Greedy continuation, one full forward per token (no cache), EOS kept."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n_new):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            out.append(nxt)
            ids.append(nxt)
            if nxt == eos:
                break
    return out


def _hand_batch(prompts, completions):
    """The training batch a sampled step must build, written out row by row."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    ids, attn, labels = [], [], []
    for p, c in zip(prompts, completions):
        pad = width - len(p) - len(c)
        ids.append(p + c + [PAD] * pad)
        attn.append([1] * (len(p) + len(c)) + [0] * pad)
        labels.append([IGNORE] * len(p) + c + [IGNORE] * pad)
    return {k: torch.tensor(v) for k, v in (("input_ids", ids), ("attention_mask", attn),
                                            ("labels", labels))}  # fmt: skip


def _capture(d):
    """Record the micro-batches the method's step receives."""
    seen, orig = [], d.method.step

    def step(micro, quiz):
        seen.append([{k: v.clone() for k, v in mb.items()} for mb in micro])
        return orig(micro, quiz)

    d.method.step = step
    return seen


# -- the keys -----------------------------------------------------------------------------------


def test_keys_defaults_and_errors():
    cfg = load_config(None, ["data.task_type=causal_lm", "method.lmbda=0.5"])
    g = cfg.method.generation
    assert (cfg.method.lmbda, cfg.method.seq_kd) == (0.5, False)
    assert (g.backend, g.temperature, g.top_p, g.max_new_tokens) == ("hf", 1.0, 1.0, 32)
    bad = [
        (["method.lmbda=1.5"], "method.lmbda"),
        (["method.lmbda=0.5"], "data.task_type=causal_lm"),  # the default task: classification
        (["data.task_type=causal_lm", "method.generation.top_p=0"], "method.generation.top_p"),
        (["data.task_type=causal_lm", "method.generation.backend=vllm"], "backend"),
        (["data.task_type=causal_lm", "method.seq_kd=true", "method.name=student_only"],
         "student_only' does not distil"),
        (["data.task_type=causal_lm", "data.source=files", "data.train_file=x.jsonl",
          "data.format=text", "method.lmbda=1"], "data.format=text has no prompts"),
        (["data.task_type=causal_lm", "method.lmbda_start_step=10"],
         "method.lmbda_start_step=10 schedules .* method.lmbda=0"),
        (["data.task_type=causal_lm", "method.seq_kd=true", "method.lmbda_warmup_steps=5"],
         "method.lmbda_warmup_steps=5"),
        (["data.task_type=causal_lm", "method.lmbda=0.5", "method.lmbda_warmup_steps=-1"],
         "method.lmbda_warmup_steps"),
    ]  # fmt: skip
    for overrides, match in bad:
        with pytest.raises(ConfigError, match=match):
            load_config(None, overrides)


def test_bad_input_errors():
    b = lm_batch(3, seed=1)
    b["labels"][1] = b["input_ids"][1]  # a text row: the loss starts at its first token
    with pytest.raises(DataError, match="training row 1 has none"):
        batch_prompts(b)
    t, s = _pair()
    with pytest.raises(ConfigError, match="EOS token"):
        make_distiller("online_kd", t, s, task="causal_lm", lmbda=1.0, tokenizer=Tok(None))
    with pytest.raises(ConfigError, match="needs the run's tokenizer"):
        make_distiller("online_kd", t, s, task="causal_lm", lmbda=1.0)
    ds = {"labels": [[IGNORE] * 7 + [5, 6], [IGNORE] * 2 + [5]]}
    check_prompt_room(ds, max_new_tokens=9, max_length=16)
    with pytest.raises(ConfigError, match=r"max_new_tokens to <= 9 or raise data.max_length"):
        check_prompt_room(ds, max_new_tokens=10, max_length=16)


# -- the generated batch ------------------------------------------------------------------------


@pytest.mark.parametrize("seq_kd", [False, True])  # the student generates, or the teacher
def test_greedy_step_trains_on_the_hand_built_batch(seq_kd):
    """lmbda = 1 (or seq_kd), temperature 0: the batch the method gets is, row by row, the
    prompt followed by the generator's greedy continuation (EOS kept), right-padded, labels on
    the generated tokens only; both models back in train mode with checkpointing on."""
    t, s = _pair(seed=4)
    gen_model = t if seq_kd else s
    micro = lm_batch(5, seed=7)
    prompts = batch_prompts(micro)
    eos = _greedy_eos(gen_model, prompts[0])  # row 0 stops at once, with EOS only
    n_new = 6
    want = _hand_batch(prompts, [_greedy_by_hand(gen_model, p, eos, n_new) for p in prompts])
    assert want["labels"][0].ne(IGNORE).sum() == 1  # the EOS alone
    assert (want["attention_mask"].sum(1) < want["input_ids"].shape[1]).any()  # padding
    s.activation_checkpointing_enable({"use_reentrant": False})
    keys = dict(lmbda=0.0 if seq_kd else 1.0, seq_kd=seq_kd)
    d = make_distiller(
        "online_kd", t, s, task="causal_lm", tokenizer=Tok(eos), seed=3, **keys,
        generation={"temperature": 0.0, "max_new_tokens": n_new},
    )  # fmt: skip
    seen = _capture(d)
    m = d.step(micro)
    got = seen[0][0]
    for k in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(got[k], want[k]), (k, got[k], want[k])
    assert s.training and t.training and all(x.training for x in s.modules())
    assert _checkpointing(s)
    gen_tokens = want["labels"].ne(IGNORE).sum().item()
    assert m["gen_len_mean"] == pytest.approx(gen_tokens / 5)
    assert m["gen_tokens_per_s"] > 0 and m["train_tokens_per_s"] > 0
    assert ("onpolicy" in m) == (not seq_kd)


@pytest.mark.parametrize("method", ["vanilla_kd", "online_kd", "lgtm", "metadistil"])
def test_sampled_step_objective_is_kd_alone(method):
    """On a sampled step the student's loss is the KD term alone (alpha_student 0.5 in the
    config; no CE on sampled tokens), the method runs unchanged and stays finite, and the next
    off-policy step has the configured alphas back. The frozen teacher (vanilla KD) gives the
    expected loss from the models before the step."""
    t, s = _pair(seed=2)
    micro, quiz = lm_batch(4, seed=11), lm_batch(4, seed=12)
    d = make_distiller(method, t, s, task="causal_lm", tokenizer=Tok(1), lmbda=1.0,
                       alpha_student=0.5, generation={"max_new_tokens": 4})  # fmt: skip
    seen = _capture(d)
    m = d.step(micro, quiz if d.method.needs_quiz else None)
    assert m["onpolicy"] == 1.0 and torch.isfinite(torch.tensor(m["student_loss"]))
    if method == "lgtm":
        assert m["influence"].shape == (4,) and torch.isfinite(m["influence"]).all()
    assert d.config.alpha_student == 0.5 and d.config.alpha_teacher == 0.4
    if method == "vanilla_kd":
        t2, s2 = _pair(seed=2)  # the models as they were before the step
        b = seen[0][0]
        with torch.no_grad():
            zs, zt = s2(**_inputs(b)).logits, t2.eval()(**_inputs(b)).logits
        kd = d.task.distill_loss(zs, zt, b["labels"], alpha=1.0, temperature=1.0,
                                 scale_by_t2=False, beta=0.0)  # fmt: skip
        assert m["student_loss"] == pytest.approx(float(kd), rel=1e-5)


def _inputs(b):
    return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}


def _flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


def test_sampled_step_teacher_keeps_its_ce_on_the_gold_completions():
    """Online KD, float64, dropout 0, one sampled step with alpha_teacher 0.4 and two
    micro-batches: the teacher's gradient is 0.4 KD over the sampled rows (the student's
    prediction the target) + 0.6 CE over the data set's completions of the same prompts, each a
    mean over its own token count in the global batch; its reported gold CE matches."""
    from ..helpers import capture_grads

    t = tiny_decoder("gpt2-teacher", 4, torch.float64)
    s = tiny_decoder("gpt2-student", 5, torch.float64)
    t0, s0 = copy.deepcopy(t), copy.deepcopy(s)
    gold = [lm_batch(3, seed=21), lm_batch(2, seed=22)]
    d = make_distiller("online_kd", t, s, task="causal_lm", tokenizer=Tok(1), lmbda=1.0,
                       alpha_teacher=0.4, gradient_accumulation_steps=2,
                       generation={"max_new_tokens": 5})  # fmt: skip
    seen, got = _capture(d), capture_grads(d.teacher.optimizer, list(t.parameters()))
    m = d.step(gold)
    sampled = seen[0]
    assert not torch.equal(sampled[0]["labels"], gold[0]["labels"])  # generated rows
    n_gen = sum(int(b["labels"][:, 1:].ne(IGNORE).sum()) for b in sampled)
    n_gold = sum(int(b["labels"][:, 1:].ne(IGNORE).sum()) for b in gold)
    kd = ce = 0.0
    for b, g in zip(sampled, gold):
        with torch.no_grad():
            zs = s0(**_inputs(b)).logits
        rows = int(b["labels"][:, 1:].ne(IGNORE).sum())
        kd = (
            kd
            + d.task.distill_loss(
                t0(**_inputs(b)).logits,
                zs,
                b["labels"],
                alpha=1.0,
                temperature=1.0,
                scale_by_t2=False,
                beta=0.0,
            )
            * rows
        )
        rows = int(g["labels"][:, 1:].ne(IGNORE).sum())
        ce = ce + d.task.task_loss(t0(**_inputs(g)).logits, g["labels"]) * rows
    loss = 0.4 * kd / n_gen + 0.6 * ce / n_gold
    want = torch.autograd.grad(loss, list(t0.parameters()))
    err = float((_flat(got[0]) - _flat(want)).norm() / _flat(want).norm())
    assert err < 1e-10, err
    assert m["teacher_gold_ce"] == pytest.approx(float(ce.detach() / n_gold), rel=1e-10)


def test_metadistil_sampled_step_moves_teacher_ce_to_the_gold_completions():
    """MetaDistil with teacher_ce_weight 0.5 on a sampled step: the teacher's gradient is the
    weight-0 run's (the same samples: seeded) plus 0.5 CE over the data set's completions."""
    from ..helpers import capture_grads

    grads, base = [], None
    for ce_w in (0.0, 0.5):
        t = tiny_decoder("gpt2-teacher", 6, torch.float64)
        s = tiny_decoder("gpt2-student", 7, torch.float64)
        base = base or copy.deepcopy(t)
        d = make_distiller("metadistil", t, s, task="causal_lm", tokenizer=Tok(1), lmbda=1.0,
                           metadistil={"teacher_ce_weight": ce_w},
                           generation={"max_new_tokens": 4})  # fmt: skip
        rec = capture_grads(d.teacher.optimizer, list(t.parameters()))
        m = d.step(lm_batch(4, seed=31), lm_batch(3, seed=32))
        grads.append(_flat(rec[0]))
        assert ("teacher_gold_ce" in m) == (ce_w > 0)
    gold = lm_batch(4, seed=31)
    ce = d.task.task_loss(base(**_inputs(gold)).logits, gold["labels"])
    want = _flat(torch.autograd.grad(0.5 * ce, list(base.parameters())))
    err = float((grads[1] - grads[0] - want).norm() / want.norm())
    assert err < 1e-9, err


def test_lmbda_zero_is_bit_identical_to_off_policy():
    """lmbda = 0 with the on-policy component in place (it draws every step, never
    generates): parameters after three LGTM steps equal the off-policy run's bit for bit."""
    runs = []
    for tok in (None, Tok(1)):
        t, s = _pair(seed=5)
        kw = {"tokenizer": tok} if tok else {}
        d = make_distiller("lgtm", t, s, task="causal_lm", lmbda=0.0, **kw)
        for k in range(3):
            d.step(lm_batch(4, seed=20 + k), lm_batch(4, seed=40 + k))
        runs.append([p.detach().clone() for m in (t, s) for p in m.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# -- sampling, modes ----------------------------------------------------------------------------


def test_sampling_is_seeded_and_leaves_the_training_rng_alone():
    t, s = _pair(seed=6)
    engine = TorchEngine(s, None)
    prompts = batch_prompts(lm_batch(4, seed=3))
    cfg = GenerationSettings(1.0, 0.9, 5, PAD, eos_id=1, vocab=LM_VOCAB - 3)
    state = torch.get_rng_state()
    a = HFGenerator().generate(engine, prompts, cfg, seed=11).completions
    assert torch.equal(torch.get_rng_state(), state)  # dropout masks stay what they were
    assert HFGenerator().generate(engine, prompts, cfg, seed=11).completions == a
    assert HFGenerator().generate(engine, prompts, cfg, seed=12).completions != a
    assert all(0 < len(c) <= 5 and max(c) < LM_VOCAB - 3 for c in a)  # the vocab cut holds


def test_sampling_follows_method_generation_not_the_checkpoints_settings(monkeypatch):
    """A checkpoint's own generation_config.json (an instruct model's temperature / top_p /
    repetition penalty) leaves on-policy sampling as method.generation says, and is restored."""
    import contextlib

    from transformers import GenerationConfig

    from lgtm_ds.tasks import rollout

    t, s = _pair(seed=6)
    engine = TorchEngine(s, None)
    prompts = batch_prompts(lm_batch(4, seed=3))
    cfg = GenerationSettings(1.0, 1.0, 6, PAD, eos_id=1, vocab=LM_VOCAB - 3)
    plain = HFGenerator().generate(engine, prompts, cfg, seed=5).completions
    own = GenerationConfig(
        do_sample=True, temperature=0.05, top_p=0.3, top_k=3, repetition_penalty=20.0,
        no_repeat_ngram_size=1,
    )  # fmt: skip
    s.generation_config = own
    assert HFGenerator().generate(engine, prompts, cfg, seed=5).completions == plain
    assert s.generation_config is own
    # without the guard Hugging Face would have taken the checkpoint's settings
    monkeypatch.setattr(rollout, "neutral_generation_config", lambda m: contextlib.nullcontext())
    assert HFGenerator().generate(engine, prompts, cfg, seed=5).completions != plain


def test_generation_mode_is_eval_and_restores_dropout_and_checkpointing():
    from lgtm_ds.tasks.base import ModelOptions
    from lgtm_ds.tasks.causal_lm import CausalLMTask

    opts = ModelOptions(vocab_size=LM_VOCAB, dropout=0.2, seed=0, pad_token_id=0)
    model = CausalLMTask().build_model("embedded:tiny", role="student", options=opts)
    model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    model.model.norm.eval()  # a submodule in eval mode stays so
    seen = []
    model.register_forward_pre_hook(
        lambda mod, args: seen.append((mod.training, torch.is_grad_enabled()))
    )
    engine = TorchEngine(model, None)
    cfg = GenerationSettings(1.0, 1.0, 3, PAD, eos_id=1)
    HFGenerator().generate(engine, [[5, 6, 7], [8]], cfg, seed=0)
    assert seen and all(x == (False, False) for x in seen)  # eval, no graph, every forward
    assert model.training and model.model.layers[0].training and not model.model.norm.training
    assert _checkpointing(model)
    with pytest.raises(RuntimeError), generation_mode(model):
        raise RuntimeError  # restored on an error too
    assert model.training and _checkpointing(model)


def _checkpointing(model) -> bool:
    on = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    return len(on) > 0


def test_draw_is_seeded_per_step_and_keeps_its_fraction():
    t, s = _pair()
    d = make_distiller("online_kd", t, s, task="causal_lm", tokenizer=Tok(1), lmbda=0.3, seed=9)
    draws = [d.onpolicy.draw(k) for k in range(4000)]
    assert abs(sum(draws) / len(draws) - 0.3) < 0.03
    assert draws == [d.onpolicy.draw(k) for k in range(4000)]  # a function of (seed, step)
    d.onpolicy.seed = 10
    assert draws != [d.onpolicy.draw(k) for k in range(4000)]


def test_lmbda_schedule_starts_off_policy_then_ramps_on_the_same_draws():
    """lmbda 0.6, start step 100, warm-up 200: no on-policy step before step 100, the share
    rising linearly over steps 100..299 (mean 0.3), then 0.6; each step's uniform draw is the
    unscheduled run's, so from step 300 on the two runs draw the same steps."""
    t, s = _pair()
    kw = dict(task="causal_lm", tokenizer=Tok(1), lmbda=0.6, seed=9)
    plain = make_distiller("online_kd", t, s, **kw).onpolicy
    sched = make_distiller(
        "online_kd", t, s, lmbda_start_step=100, lmbda_warmup_steps=200, **kw
    ).onpolicy
    lm = [sched.lmbda_at(k) for k in range(4000)]
    assert lm[:100] == [0.0] * 100 and lm[100] == pytest.approx(0.6 / 200)
    assert lm[199] == pytest.approx(0.3) and lm[299] == pytest.approx(0.6)
    assert set(lm[300:]) == {0.6}
    draws = [sched.draw(k) for k in range(4000)]
    assert not any(draws[:100])
    assert abs(sum(draws[100:300]) / 200 - 0.3) < 0.08
    assert draws[300:] == [plain.draw(k) for k in range(300, 4000)]
    # ramp only: the first step's share is lmbda / warmup
    ramp = make_distiller("online_kd", t, s, lmbda_warmup_steps=4, **kw).onpolicy
    assert [ramp.lmbda_at(k) for k in range(5)] == pytest.approx([0.15, 0.3, 0.45, 0.6, 0.6])


def test_lmbda_schedule_is_logged_and_kept_through_the_steps_drawn():
    """The step's share is in the metrics of a scheduled run (``lmbda``), and the steps are
    counted by the component, so a resumed run (its state loaded) continues the schedule."""
    t, s = _pair()
    kw = dict(task="causal_lm", tokenizer=Tok(1), lmbda=1.0, seed=3, lmbda_start_step=2)
    d = make_distiller("online_kd", t, s, **kw)
    mb = lm_batch(2, seed=4)
    seen = [d.onpolicy.prepare([mb])[1] for _ in range(2)]
    assert [(m["onpolicy"], m["lmbda"]) for m in seen] == [(0.0, 0.0), (0.0, 0.0)]
    e = make_distiller("online_kd", t, s, **kw)
    e.onpolicy.load_state_dict(d.onpolicy.state_dict())
    _, m, who = e.onpolicy.prepare([mb])
    assert (m["onpolicy"], m["lmbda"], who) == (1.0, 1.0, "student")
    plain = make_distiller("online_kd", t, s, task="causal_lm", tokenizer=Tok(1), lmbda=1.0)
    assert "lmbda" not in plain.onpolicy.prepare([mb])[1]  # unscheduled: the key as before


# -- resume -------------------------------------------------------------------------------------


def test_resume_in_process_equals_the_uninterrupted_run():
    """lmbda = 0.5, temperature 1, top-p 0.9: four steps in one go, or two, the models, optimizer
    and on-policy state copied into a fresh Distiller, two more: the same parameters bit for bit
    and the same draws (the sampled steps are not all alike: both kinds occur)."""

    def fresh():
        t, s = _pair(seed=8)
        return make_distiller(
            "online_kd", t, s, task="causal_lm", tokenizer=Tok(1), lmbda=0.5, seed=2,
            generation={"temperature": 1.0, "top_p": 0.9, "max_new_tokens": 5},
        )  # fmt: skip

    batches = [lm_batch(4, seed=60 + k) for k in range(4)]
    ref = fresh()
    kinds = [ref.step(b)["onpolicy"] for b in batches]
    assert set(kinds) == {0.0, 1.0}, kinds
    first = fresh()
    for b in batches[:2]:
        first.step(b)
    saved = {
        "models": [copy.deepcopy(e.module.state_dict()) for e in (first.teacher, first.student)],
        "optims": [copy.deepcopy(e.optimizer.state_dict()) for e in (first.teacher, first.student)],
        "onpolicy": copy.deepcopy(first.onpolicy.state_dict()),
    }
    second = fresh()
    for e, m, o in zip((second.teacher, second.student), saved["models"], saved["optims"]):
        e.module.load_state_dict(m)
        e.optimizer.load_state_dict(o)
    second.onpolicy.load_state_dict(saved["onpolicy"])
    got = [second.step(b)["onpolicy"] for b in batches[2:]]
    assert got == kinds[2:]
    for e, f in zip((ref.teacher, ref.student), (second.teacher, second.student)):
        assert all(torch.equal(p, q) for p, q in zip(e.module.parameters(), f.module.parameters()))


def test_onpolicy_lgtm_teacher_update_equals_the_naive_form_fp64():
    """Float64, GPT-2 blocks, dropout 0, three on-policy steps (temperature 1, top-p 0.9): on
    each step's sampled micro-batch (as the method got it) the cheap form's teacher gradient and
    per-sequence influence equal the naive form's (deep copies, three teacher backward passes):
    the student on KD alone, the teacher on a_t KD (with the influence) over the sampled rows
    plus (1 - a_t) CE over the data set's completions of the same prompts; both students stay
    equal."""
    from lgtm_ds.engines.optim import build_adamw
    from lgtm_ds.methods.naive import naive_lgtm_step

    from .test_algorithm import _capture_grads, _rel

    t = tiny_decoder("gpt2-teacher", 1, torch.float64)
    s = tiny_decoder("gpt2-student", 2, torch.float64)
    to, so = build_adamw(t, 3e-3, 0.01), build_adamw(s, 5e-3, 0.01)
    t2, s2, to2, so2 = copy.deepcopy((t, s, to, so))
    d = Distiller(
        "lgtm", teacher=t, student=s, teacher_optimizer=to, student_optimizer=so,
        task="causal_lm", tokenizer=Tok(1), lmbda=1.0, alpha_student=0.8,
        generation={"temperature": 1.0, "top_p": 0.9, "max_new_tokens": 6},
    )  # fmt: skip
    seen, cheap = _capture(d), _capture_grads(to, list(t.parameters()))
    for step in range(3):
        q, gold = lm_batch(3, 200 + step), lm_batch(5, 100 + step)
        m = d.step(gold, q)
        b = seen[-1][0]
        assert b["labels"].ne(IGNORE).sum() > 5  # sampled tokens to learn from
        ref = naive_lgtm_step(t2, s2, to2, so2, b, q, task=d.task, alpha_student=0.8,
                              gold_batch=gold)  # fmt: skip
        err = _rel(cheap[-1], ref["G"])
        assert err < 1e-6, f"step {step}: teacher gradient relative error {err:.2e}"
        infl = float((m["influence"] - ref["influence"]).norm() / ref["influence"].norm())
        assert infl < 1e-6, f"step {step}: influence relative error {infl:.2e}"
        assert _rel(list(s.parameters()), list(s2.parameters())) < 1e-9
        print(f"step {step}: G rel. error {err:.1e}, influence rel. error {infl:.1e}")


@pytest.mark.parametrize("method", ["online_kd", "lgtm"])
def test_sampled_steps_on_the_fused_head_equal_full_logits(method):
    """Float64, GPT-2 blocks, three steps at lmbda 0.5 (sampled and data-set steps both):
    the fused output layer (hidden states in, losses chunk by chunk) trains both models as the
    full-logit path does, on the same samples (generation reads the plain logits either way)."""
    runs = []
    for fused in (False, True):
        t = tiny_decoder("gpt2-teacher", 1, torch.float64)
        s = tiny_decoder("gpt2-student", 2, torch.float64)
        d = make_distiller(method, t, s, task="causal_lm", tokenizer=Tok(1), lmbda=0.5, seed=3,
                           fused_head=fused, generation={"max_new_tokens": 5})  # fmt: skip
        kinds = []
        for k in range(3):
            quiz = lm_batch(3, 200 + k) if d.method.needs_quiz else None
            kinds.append(d.step(lm_batch(5, 100 + k), quiz)["onpolicy"])
        assert not d.full_logits, d.full_logits  # the fused head was in use
        runs.append((t, s, kinds))
    assert runs[0][2] == runs[1][2] and set(runs[0][2]) == {0.0, 1.0}, runs[0][2]
    for a, b in ((runs[0][0], runs[1][0]), (runs[0][1], runs[1][1])):
        pairs = zip(a.parameters(), b.parameters())
        err = max(float((p - q).detach().abs().max()) for p, q in pairs)
        assert err < 1e-10, err


def test_onpolicy_lgtm_with_lora_on_both_sides_equals_the_naive_form_fp64():
    """LoRA adapters on the teacher and the student (the student generates through its peft
    wrapper), float64, two on-policy LGTM steps: the cheap form's teacher gradient over the
    adapter parameters equals the naive form's on the sampled rows (+ the teacher's CE on the
    data set's completions), and every frozen base weight is unchanged."""
    pytest.importorskip("peft")
    from lgtm_ds.engines.optim import build_adamw
    from lgtm_ds.methods.naive import naive_lgtm_step

    from ..helpers import capture_grads
    from .test_adapters import _decoders
    from .test_algorithm import _rel

    t, s = _decoders(("teacher", "student"))
    to, so = build_adamw(t, 3e-3, 0.01), build_adamw(s, 5e-3, 0.01)
    t2, s2, to2, so2 = copy.deepcopy((t, s, to, so))
    frozen = [p.detach().clone() for m in (t, s) for p in m.parameters() if not p.requires_grad]
    d = Distiller(
        "lgtm", teacher=t, student=s, teacher_optimizer=to, student_optimizer=so,
        task="causal_lm", tokenizer=Tok(1), lmbda=1.0, alpha_student=0.8,
        generation={"temperature": 1.0, "max_new_tokens": 5},
    )  # fmt: skip
    seen = _capture(d)
    cheap = capture_grads(to, [p for p in t.parameters() if p.requires_grad])
    for step in range(2):
        q, gold = lm_batch(3, 210 + step), lm_batch(4, 110 + step)
        d.step(gold, q)
        b = seen[-1][0]
        assert b["labels"].ne(IGNORE).sum() > 4
        ref = naive_lgtm_step(t2, s2, to2, so2, b, q, task=d.task, alpha_student=0.8,
                              gold_batch=gold)  # fmt: skip
        err = _rel(cheap[-1], ref["G"])
        assert err < 1e-6, f"step {step}: teacher gradient relative error {err:.2e}"
        assert _rel(list(s.parameters()), list(s2.parameters())) < 1e-9
    now = [p for m in (t, s) for p in m.parameters() if not p.requires_grad]
    assert len(now) == len(frozen) > 0
    assert all(torch.equal(a, b) for a, b in zip(now, frozen))
