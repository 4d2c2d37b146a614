"""Students made from a teacher (``model.student: from_teacher``): a layer subset equals the
teacher run through those blocks only, KV-cache generation agrees with a cache-free loop (each
block's cache slot renumbered), tied embeddings stay tied, random-init students take the
teacher's architecture and vocabulary; bad layer lists and config keys are one error each."""

import copy
import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from lgtm_ds import ConfigError
from lgtm_ds.config import load_config
from lgtm_ds.tasks.derive import block_list, derive_student

V = 41


def _bert():
    return BertForSequenceClassification(
        BertConfig(
            vocab_size=V,
            hidden_size=24,
            num_hidden_layers=5,
            num_attention_heads=4,
            intermediate_size=40,
            num_labels=3,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    )


def _llama_tied():  # grouped-query attention, tied embeddings (SmolLM2's shape)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=V,
            hidden_size=36,
            num_hidden_layers=5,
            num_attention_heads=6,
            num_key_value_heads=2,
            intermediate_size=44,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    )


def _gpt2():
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=V,
            n_embd=24,
            n_layer=5,
            n_head=4,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=1,
            eos_token_id=2,
        )
    )


def _qwen2_sliding():  # per-layer config list (layer_types) that must follow the kept layers
    return Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=V,
            hidden_size=32,
            num_hidden_layers=5,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=40,
            use_sliding_window=True,
            sliding_window=4,
            max_window_layers=2,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
        )
    )


BUILDERS = {"bert": _bert, "llama_tied": _llama_tied, "gpt2": _gpt2, "qwen2": _qwen2_sliding}


def _teacher(name):
    torch.manual_seed(7)
    model = BUILDERS[name]().eval()
    with torch.no_grad():  # no zeros anywhere (biases, a new head)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _cut_reference(teacher, keep):
    """The teacher with its block list cut to ``keep`` by hand (cache off: its blocks keep the
    teacher's cache slots, which is exactly what derive_student must renumber)."""
    ref = copy.deepcopy(teacher)
    name, blocks = block_list(ref)
    *parents, last = name.split(".")
    owner = ref
    for p in parents:
        owner = getattr(owner, p)
    setattr(owner, last, torch.nn.ModuleList([blocks[i] for i in keep]))
    ref.config.num_hidden_layers = len(keep)
    if getattr(ref.config, "layer_types", None):
        ref.config.layer_types = [ref.config.layer_types[i] for i in keep]
    return ref


def _ids(n=3, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, V, (n, length), generator=g)


def _logits(model, ids):
    kw = {} if isinstance(model, BertForSequenceClassification) else {"use_cache": False}
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


@pytest.mark.parametrize("arch", list(BUILDERS))
@pytest.mark.parametrize("keep", [[0, 2, 4], [1, 4], [3]])
def test_layer_subset_is_the_teacher_through_those_blocks(arch, keep):
    teacher = _teacher(arch)
    student = derive_student(teacher, layers=keep).eval()
    assert student.config.num_hidden_layers == len(keep)
    assert teacher.config.num_hidden_layers == 5  # the teacher is not modified
    ids = _ids()
    ref = _logits(_cut_reference(teacher, keep), ids)
    torch.testing.assert_close(_logits(student, ids), ref, rtol=0, atol=0)
    assert not torch.equal(ref, _logits(teacher, ids))  # the cut changes the function


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_every_layer_kept_is_the_teacher(arch):
    teacher = _teacher(arch)
    student = derive_student(teacher, stride=1).eval()
    ids = _ids(seed=1)
    torch.testing.assert_close(_logits(student, ids), _logits(teacher, ids), rtol=0, atol=0)


def test_stride_keeps_every_kth_layer():
    teacher = _teacher("llama_tied")
    by_stride = derive_student(teacher, stride=2).eval()
    by_list = derive_student(teacher, layers=[0, 2, 4]).eval()
    ids = _ids(seed=2)
    torch.testing.assert_close(_logits(by_stride, ids), _logits(by_list, ids), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama_tied", "gpt2", "qwen2"])
def test_kv_cache_generation_matches_a_cache_free_loop(arch):
    """Each kept block writes its own cache slot 0..k-1: generate() with the KV cache equals
    greedy decoding that recomputes the whole prefix every token."""
    teacher = _teacher(arch)
    student = derive_student(teacher, layers=[1, 3, 4]).eval()
    prompt = _ids(n=1, length=6, seed=3)
    with torch.no_grad():
        cached = student.generate(
            prompt, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None
        )
        x = prompt
        for _ in range(8):
            nxt = student(input_ids=x, use_cache=False).logits[:, -1:].argmax(-1)
            x = torch.cat([x, nxt], dim=1)
    assert torch.equal(cached, x)
    slots = [b.self_attn.layer_idx for b in block_list(student)[1]] if arch != "gpt2" else None
    assert slots in (None, [0, 1, 2])


@pytest.mark.parametrize("arch,tied", [("llama_tied", True), ("gpt2", True), ("qwen2", False)])
def test_tied_embeddings_stay_tied_and_untied_stay_apart(arch, tied):
    student = derive_student(_teacher(arch), layers=[0, 4])
    same = student.get_output_embeddings().weight is student.get_input_embeddings().weight
    assert same == tied
    if tied:  # one tensor: a step on the embedding moves the output layer too
        with torch.no_grad():
            student.get_input_embeddings().weight[5, 0] += 1.0
        assert (
            student.get_output_embeddings().weight[5, 0]
            == student.get_input_embeddings().weight[5, 0]
        )


def test_per_layer_config_lists_follow_the_kept_layers():
    teacher = _teacher("qwen2")
    assert teacher.config.layer_types[:2] == ["full_attention"] * 2
    student = derive_student(teacher, layers=[0, 3, 4])
    assert student.config.layer_types == [teacher.config.layer_types[i] for i in (0, 3, 4)]


def test_derived_student_saves_and_loads_with_plain_transformers(tmp_path):
    teacher = _teacher("llama_tied")
    student = derive_student(teacher, layers=[0, 4]).eval()
    student.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["num_hidden_layers"] == 2
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = _ids(seed=4)
    torch.testing.assert_close(_logits(again, ids), _logits(student, ids), rtol=0, atol=0)


def test_random_init_student_in_the_teachers_architecture():
    teacher = _teacher("llama_tied")
    overrides = {
        "num_hidden_layers": 2,
        "hidden_size": 24,
        "intermediate_size": 30,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    a = derive_student(teacher, config=overrides, seed=3)
    b = derive_student(teacher, config=overrides, seed=3)
    c = derive_student(teacher, config=overrides, seed=4)
    assert type(a) is type(teacher)
    assert a.config.vocab_size == V and a.config.hidden_size == 24
    assert a.get_output_embeddings().weight is a.get_input_embeddings().weight
    assert len(block_list(a)[1]) == 2
    sa, sb, sc = (m.state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # a function of (config, seed)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    with torch.no_grad():
        assert a(input_ids=_ids()).logits.shape == (3, 10, V)


def test_bad_inputs_are_one_error_naming_the_key():
    teacher = _teacher("bert")
    with pytest.raises(ConfigError, match=r"model.student_layers \[5\] out of range.*5 layers"):
        derive_student(teacher, layers=[0, 5])
    with pytest.raises(ConfigError, match="model.student_layers is empty"):
        derive_student(teacher, layers=[])
    with pytest.raises(ConfigError, match="repeats a layer"):
        derive_student(teacher, layers=[1, 1])
    with pytest.raises(ConfigError, match="model.student_config: BertConfig has no key 'n_layr'"):
        derive_student(teacher, config={"n_layr": 2})
    with pytest.raises(ConfigError, match="model.student_config .* cannot be built"):
        derive_student(teacher, config={"hidden_size": 25})  # not a multiple of 4 heads
    with pytest.raises(ConfigError, match="exclude each other"):
        derive_student(teacher, layers=[0], config={"num_hidden_layers": 1})
    with pytest.raises(ConfigError, match="needs model.student_layers"):
        derive_student(teacher)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["model.student_layers=[0,2]"], "set model.student: from_teacher"),
        (["model.student=from_teacher"], r"set model.student_layers \(e.g. \[0, 2, 4\]\)"),
        (["model.student=from_teacher", "model.student_layers=[]"], "student_layers is empty"),
        (["model.student=from_teacher", "model.student_layers=[0,-1]"], "distinct and >= 0"),
        (
            [
                "model.student=from_teacher",
                "model.student_layers=[0]",
                "model.student_layer_stride=2",
            ],
            "set one way",
        ),
        (["model.student=from_teacher", "model.student_config={}"], "student_config is empty"),
    ],
)
def test_config_checks_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)
