"""LoRA adapters (model.teacher_peft / model.student_peft, docs/adapters.md): the sections' rules,
the per-architecture targets, the errors, and the LGTM step with adapters on either side or both
== the reference form over the trainable parameters in float64, frozen weights bit-identical."""

import copy
import json
import sys

import pytest
import torch

from lgtm_ds import ConfigError, Distiller
from lgtm_ds.config import load_config
from lgtm_ds.engines.optim import build_adamw
from lgtm_ds.errors import ModelError
from lgtm_ds.methods.naive import naive_lgtm_step
from lgtm_ds.tasks import get_task
from lgtm_ds.tasks.adapters import AdapterOptions, apply_adapters, merged_state_dict, peft_wrapper

from ..helpers import capture_grads, lm_batch, random_batch, tiny_decoder, tiny_model
from .test_algorithm import _rel

pytest.importorskip("peft")

LM = get_task("causal_lm")()


def _lora(model, key="model.student_peft", name="embedded:x", **kw):
    return apply_adapters(model, AdapterOptions(enabled=True, **kw), key=key, name=name)


def _trainable(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _randomise_b(model, seed):
    """LoRA starts with B = 0 (the adapted model == the base); tests need no zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.2)


# -- the sections --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.teacher_peft.r=4"], "model.teacher_peft.r is set but model.teacher_peft.enabled"),
        (
            [
                "model.student_peft.enabled=true",
                "model.student_peft.adapter=/a",
                "model.student_peft.r=2",
            ],
            "model.student_peft.r: the adapter folder",
        ),
        (["model.student_peft.enabled=true", "model.student_peft.target_modules=[]"], "is empty"),
        (["model.teacher_peft.dropout=1.0"], "model.teacher_peft.dropout"),
        (["model.teacher_peft.rank=4"], "unknown key 'model.teacher_peft.rank'"),
    ],
)
def test_bad_sections_are_one_error_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_sections_default_off_and_an_empty_section_is_the_default():
    cfg = load_config(None, {"model": {"teacher_peft": None}})
    assert not cfg.model.teacher_peft.enabled and not cfg.model.student_peft.enabled
    m = tiny_decoder()
    before = _trainable(m)
    assert apply_adapters(m, cfg.model.student_peft, key="k", name="n") is m
    assert _trainable(m) == before and peft_wrapper(m) is None


# -- targets per architecture ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,layers",
    [
        ("gpt2-student", {"c_attn", "c_proj", "c_fc"}),
        ("tiny", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ],
)
def test_decoder_defaults_adapt_attention_and_mlp_and_freeze_the_rest(name, layers):
    m = tiny_decoder(name)
    n_base = sum(p.numel() for p in m.parameters())
    _lora(m, r=2)
    names = _trainable(m)
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names} == layers
    # the base weights are all still there, frozen
    assert sum(p.numel() for p in m.parameters() if not p.requires_grad) == n_base


def test_classifier_defaults_train_the_head_in_full():
    m = tiny_model()
    _lora(m, r=2)
    names = _trainable(m)
    head = [n for n in names if n.startswith("classifier.")]
    assert head == [
        "classifier.modules_to_save.default.weight",
        "classifier.modules_to_save.default.bias",
    ]
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names if ".lora_" in n}
    assert adapted == {"query", "key", "value", "dense"}
    m2 = tiny_model()
    _lora(m2, r=2, modules_to_save=[])  # [] = none
    assert not [n for n in _trainable(m2) if n.startswith("classifier.")]


def test_a_target_that_does_not_exist_names_the_key_and_the_layers():
    with pytest.raises(
        ModelError, match=r"model.teacher_peft.target_modules: 'q_prj' names no"
    ) as e:
        _lora(tiny_decoder("tiny"), key="model.teacher_peft", target_modules=["q_prj"])
    assert "q_proj" in str(e.value)
    with pytest.raises(ModelError, match="model.student_peft.target_modules: 'ln_1' .* LayerNorm"):
        _lora(tiny_decoder(), target_modules=["ln_1"])
    with pytest.raises(
        ModelError, match="model.student_peft.target_modules: 'lm_head' is the output"
    ):
        _lora(tiny_decoder("tiny"), target_modules=["q_proj", "lm_head"])
    with pytest.raises(
        ModelError, match="model.student_peft.modules_to_save: 'lm_head' is the output"
    ):
        _lora(tiny_decoder("tiny"), modules_to_save=["lm_head"])
    with pytest.raises(ModelError, match="model.student_peft.modules_to_save: 'head' names no"):
        _lora(tiny_model(), modules_to_save=["head"])


def test_peft_not_installed_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    with pytest.raises(
        ConfigError, match=r"model.teacher_peft.enabled needs the peft .*lgtm-ds\[peft\]"
    ):
        _lora(tiny_decoder(), key="model.teacher_peft")


def test_an_existing_adapter_is_loaded_trainable_and_checked(tmp_path):
    m = _lora(tiny_decoder(seed=3), name="embedded:gpt2-student", r=3)
    _randomise_b(m, 5)
    peft_wrapper(m).save_pretrained(str(tmp_path / "a"))
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "embedded:gpt2-student" and saved["r"] == 3
    again = apply_adapters(
        tiny_decoder(seed=3),
        AdapterOptions(enabled=True, adapter=str(tmp_path / "a")),
        key="model.student_peft",
        name="embedded:gpt2-student",
    )
    assert _trainable(again) == _trainable(m)
    b = lm_batch(3, 7)
    with torch.no_grad():
        assert torch.equal(LM_logits(again, b), LM_logits(m, b))
    with pytest.raises(
        ModelError, match="model.student_peft.adapter: .* was trained on 'embedded:gpt2-student'"
    ):
        apply_adapters(
            tiny_decoder("gpt2-teacher"),
            AdapterOptions(enabled=True, adapter=str(tmp_path / "a")),
            key="model.student_peft",
            name="embedded:gpt2-teacher",
        )
    with pytest.raises(
        ConfigError, match="model.teacher_peft.adapter: .*adapter_config.json does not exist"
    ):
        apply_adapters(
            tiny_decoder(),
            AdapterOptions(enabled=True, adapter=str(tmp_path / "missing")),
            key="model.teacher_peft",
            name="embedded:gpt2-student",
        )


def LM_logits(model, batch):  # noqa: N802
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# -- the LGTM step with adapters, float64 --------------------------------------------------------


def _decoders(sides):
    t = tiny_decoder("gpt2-teacher", 1, torch.float64)
    s = tiny_decoder("gpt2-student", 2, torch.float64)
    for role, m, seed in (("teacher", t, 11), ("student", s, 12)):
        if role in sides:
            _lora(m, key=f"model.{role}_peft", r=4, alpha=6.0)
            _randomise_b(m, seed)
    return t, s


@pytest.mark.parametrize("sides", [("teacher",), ("student",), ("teacher", "student")])
def test_lgtm_with_adapters_matches_the_reference_form_fp64(sides):
    """Teacher update and per-sequence influence of the cheap form vs the naive form (deep
    copies, three teacher backward passes), over the trainable parameters only: LoRA on the
    teacher, the student or both, GPT-2 blocks, float64, 2 steps; every frozen weight of both
    models is bit-identical after them."""
    t, s = _decoders(sides)
    to, so = build_adamw(t, 3e-3, 0.01), build_adamw(s, 5e-3, 0.01)
    t2, s2, to2, so2 = copy.deepcopy((t, s, to, so))
    frozen = {
        role: {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
        for role, m in (("teacher", t), ("student", s))
    }
    assert bool(frozen["teacher"]) == ("teacher" in sides)
    hp = dict(alpha_student=0.8, alpha_teacher=0.4, temperature=1.5)
    d = Distiller(
        "lgtm", teacher=t, student=s, teacher_optimizer=to, student_optimizer=so, task=LM, **hp
    )
    t_params = [p for p in t.parameters() if p.requires_grad]
    cheap = capture_grads(to, t_params)
    for step in range(2):
        b, q = lm_batch(5, 300 + step), lm_batch(3, 400 + step)
        m = d.step(b, q)
        ref = naive_lgtm_step(t2, s2, to2, so2, b, q, task=LM, **hp)
        err = _rel(cheap[-1], ref["G"])
        assert err < 1e-6, f"step {step}: teacher gradient relative error {err:.2e}"
        infl = float((m["influence"] - ref["influence"]).norm() / ref["influence"].norm())
        assert infl < 1e-6, f"step {step}: influence relative error {infl:.2e}"
        assert _rel(list(s.parameters()), list(s2.parameters())) < 1e-9
        assert _rel(list(t.parameters()), list(t2.parameters())) < 1e-9
    for role, m in (("teacher", t), ("student", s)):
        for n, p in m.named_parameters():
            if not p.requires_grad:
                assert torch.equal(p, frozen[role][n]), f"{role} {n} changed"
                assert p.grad is None, f"{role} {n} got a gradient"


def test_zero_b_lora_follows_the_base_models_first_step_loss():
    """LoRA starts at B = 0: the adapted models compute the base models' function (the logits
    bit for bit), so the first LGTM step's teacher loss is the base pair's."""
    losses, logits = [], []
    b, q = lm_batch(4, 1), lm_batch(3, 2)
    for sides in ((), ("teacher", "student")):
        t = tiny_decoder("gpt2-teacher", 1, torch.float64)
        s = tiny_decoder("gpt2-student", 2, torch.float64)
        for role, m in (("teacher", t), ("student", s)):
            if role in sides:
                _lora(m, key=f"model.{role}_peft", r=4)
        with torch.no_grad():
            logits.append([LM_logits(m, b) for m in (t, s)])
        d = Distiller(
            "lgtm",
            teacher=t,
            student=s,
            teacher_optimizer=build_adamw(t, 3e-3, 0.0),
            student_optimizer=build_adamw(s, 5e-3, 0.0),
            task=LM,
        )
        losses.append(d.step(b, q)["teacher_loss"])
    assert all(torch.equal(x, y) for x, y in zip(*logits))
    assert losses[1] == pytest.approx(losses[0], rel=1e-12, abs=0)


def test_gradient_checkpointing_reaches_the_adapters():
    """A frozen embedding makes the checkpointed blocks' input require no gradient (the
    ``enable_input_require_grads`` trap): the adapters' gradients with checkpointing on equal
    those without."""
    grads = []
    for on in (False, True):
        m = tiny_decoder("tiny", 4, torch.float64)
        _lora(m, r=2)
        _randomise_b(m, 9)
        if on:
            m.gradient_checkpointing_enable({"use_reentrant": True})
        m.train()
        b = lm_batch(3, 5)
        LM.task_loss(LM_logits(m, b), b["labels"]).backward()
        grads.append([p.grad.clone() for p in m.parameters() if p.requires_grad])
    assert all(g.abs().sum() > 0 for g in grads[1])
    assert _rel(grads[1], grads[0]) < 1e-12


def test_classifier_lora_pair_steps_and_keeps_frozen_weights():
    """A BERT classifier pair with adapters on both sides (the head trained in full): every
    method's step runs and touches the trainable parameters only."""
    for method in ("lgtm", "online_kd", "metadistil"):
        t, s = tiny_model(torch.float64, seed=1), tiny_model(torch.float64, seed=2)
        _lora(t, key="model.teacher_peft", r=2)
        _lora(s, r=2)
        frozen = [p.detach().clone() for m in (t, s) for p in m.parameters() if not p.requires_grad]
        train = [p.detach().clone() for m in (t, s) for p in m.parameters() if p.requires_grad]
        d = Distiller(
            method,
            teacher=t,
            student=s,
            teacher_optimizer=build_adamw(t, 1e-2, 0.0),
            student_optimizer=build_adamw(s, 1e-2, 0.0),
        )
        d.step(random_batch(4, 1), random_batch(3, 2))
        after = [p for m in (t, s) for p in m.parameters() if not p.requires_grad]
        assert all(torch.equal(a, b) for a, b in zip(after, frozen)), method
        now = [p for m in (t, s) for p in m.parameters() if p.requires_grad]
        assert any(not torch.equal(a, b) for a, b in zip(now, train)), method


# -- saving ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_the_merged_model_loads_with_plain_transformers_and_computes_the_same(tmp_path, arch):
    """``W + (alpha / r) B A`` in each adapted layer (GPT-2's transposed Conv1D included), the
    trained head copy in the head's place: a plain model, no missing or unexpected keys, the
    adapted model's logits in float64."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if arch == "bert":
        m, auto, batch = (
            tiny_model(torch.float64, 1),
            AutoModelForSequenceClassification,
            random_batch(3, 1),
        )
    else:
        name = "gpt2-student" if arch == "gpt2" else "tiny"
        m, auto, batch = tiny_decoder(name, 1, torch.float64), AutoModelForCausalLM, lm_batch(3, 1)
    _lora(m, r=3, alpha=5.0)
    _randomise_b(m, 2)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "modules_to_save" in n:  # the head copy trained away from the original
                p.add_(0.5)
    state = {k: v.detach().clone() for k, v in m.state_dict().items()}
    m.save_pretrained(tmp_path, state_dict=merged_state_dict(m, state))
    plain, info = auto.from_pretrained(tmp_path, dtype=torch.float64, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not any("lora" in n or "base_layer" in n for n, _ in plain.named_parameters())
    m.eval()
    plain.eval()
    x = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        want, got = m(**x).logits, plain(**x).logits
    assert float((got - want).abs().max()) < 1e-12 * float(want.abs().max()) + 1e-14


def test_hidden_state_projection_stays_trainable_beside_student_adapters():
    """Hidden-state KD across widths with a LoRA student: the projection, added after the
    adapters, trains in full; the student's base does not move."""
    from lgtm_ds.methods.hidden import HIDDEN_PROJ

    from .test_hidden import _models

    t, s = _models(same_width=False)
    _lora(s, r=2)
    frozen = {n: p.detach().clone() for n, p in s.named_parameters() if not p.requires_grad}
    d = Distiller(
        "lgtm",
        teacher=t,
        student=s,
        teacher_optimizer=build_adamw(t, 1e-2, 0.0),
        student_optimizer=build_adamw(s, 1e-2, 0.0),
        hidden_weight=0.5,
    )
    proj = getattr(s, HIDDEN_PROJ)
    before = [p.detach().clone() for p in proj.parameters()]
    assert all(p.requires_grad for p in proj.parameters())
    m = d.step(random_batch(4, 1), random_batch(3, 2))
    assert m["student_hidden_loss"] > 0
    assert all(not torch.equal(p, b) for p, b in zip(proj.parameters(), before))
    assert all(torch.equal(p, frozen[n]) for n, p in s.named_parameters() if n in frozen)


def test_param_counts_leave_the_adapters_out_of_the_model_size():
    """The summary's model size is the base model's (as saved merged); the trainable count is
    the adapters' and the trained head copy's."""
    from lgtm_ds.tasks.adapters import param_counts
    from lgtm_ds.training.summary import _params

    base = tiny_model()
    n_base = sum(p.numel() for p in base.parameters())
    assert param_counts(base) == (n_base, n_base)
    m = _lora(tiny_model(), r=2)
    total, trainable = param_counts(m)
    lora = sum(p.numel() for n, p in m.named_parameters() if "lora_" in n)
    head = sum(p.numel() for n, p in m.named_parameters() if ".modules_to_save." in n)
    assert total == n_base and lora > 0 and head > 0
    assert trainable == lora + head == sum(p.numel() for p in m.parameters() if p.requires_grad)
    s = {"params": {"student": total}, "trainable_params": {"student": trainable}}
    assert _params(s, "student") == f"{total / 1e6:.2f}M params, {trainable / 1e6:.2f}M trainable"


def test_influence_term_through_a_frozen_fused_output_layer():
    """A bf16 LGTM teacher backpropagates its influence term apart (``grads_through``); with
    LoRA the output layer is frozen: its weight gets no gradient and the adapters get the
    hidden states' (was: an error that the output layer is not among the trainable params)."""
    from lgtm_ds.engines.base import TorchEngine
    from lgtm_ds.engines.head import HeadGrad, HeadOutput, grads_through

    m = tiny_decoder("tiny", 3, torch.float64)
    _lora(m, key="model.teacher_peft", r=2)
    _randomise_b(m, 4)
    e = TorchEngine(m, None)
    e.fused_head = True
    z = e.raw_forward(lm_batch(3, seed=5))
    assert isinstance(z, HeadOutput) and not z.weight_param.requires_grad
    g = torch.Generator().manual_seed(6)
    dz = HeadGrad(torch.randn(z.hidden.shape, generator=g, dtype=torch.float64),
                  torch.randn(z.weight.shape, generator=g, dtype=torch.float64))  # fmt: skip
    params = e.params()
    got = grads_through(z, dz, params, retain_graph=True)
    want = torch.autograd.grad((z.hidden * dz.hidden).sum(), params, allow_unused=True)
    assert all(torch.equal(a, b) for a, b in zip(got, want) if b is not None)
    assert any(float(b.abs().sum()) > 0 for b in want if b is not None)
