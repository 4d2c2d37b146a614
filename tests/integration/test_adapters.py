"""LoRA adapters through the trainer (docs/adapters.md): a run with adapters on both sides
resumes bit for bit, never changes a frozen weight, and saves the adapter folder or the merged
model (which loads with plain transformers and computes what the trained model computes)."""

import json

import pytest
import torch

from lgtm_ds.config import load_config

pytest.importorskip("peft")

SMALL = [
    "data.synthetic_examples=200",
    "train.micro_batch_size=8",
    "train.eval_batch_size=64",
    "train.eval_every=0",
]
CAUSAL_LM_TINY = "configs/examples/causal_lm_tiny.yaml"
TINY_LM = [*SMALL, "data.max_length=16", "train.max_steps=1"]  # a one-step decoder run


def _frozen(trainer):
    return [
        p.detach().clone()
        for e in (trainer.teacher, trainer.student)
        for p in e.module.parameters()
        if not p.requires_grad
    ]


@pytest.mark.slow
@pytest.mark.parametrize("teacher_stage", [2, 3])
def test_lora_run_resumes_exactly_keeps_the_base_and_saves_merged(
    tmp_path, dist_env, teacher_stage
):
    """... and the checkpoints leave the frozen base out (the resumed run rebuilds it)."""
    from transformers import AutoModelForSequenceClassification

    from lgtm_ds.training import Trainer

    common = [
        *SMALL,
        f"deepspeed.teacher.zero_optimization.stage={teacher_stage}",
        "model.teacher_peft.enabled=true",
        "model.teacher_peft.r=4",
        "model.student_peft.enabled=true",
        "model.student_peft.dropout=0.1",  # the adapters' dropout draws from the RNG too
        "train.max_steps=4",
        "output.checkpoint_every=2",
        "output.merge_adapters=true",
    ]
    ta = Trainer(load_config(None, [f"output.dir={tmp_path / 'a'}", *common]))
    frozen = _frozen(ta)
    assert frozen  # the base weights of both models
    ta.finish(ta.train())
    assert all(torch.equal(p, q) for p, q in zip(_frozen(ta), frozen))
    full = [p.detach().clone() for e in (ta.student, ta.teacher) for p in e.module.parameters()]
    for role, engine in (("student", ta.student), ("teacher", ta.teacher)):
        frozen = {n for n, p in engine.module.named_parameters() if not p.requires_grad}
        trained = {n for n, p in engine.module.named_parameters() if p.requires_grad}
        (states,) = (tmp_path / "a" / "checkpoints" / role / "step2").glob("*model_states.pt")
        state = torch.load(states, weights_only=False)
        assert frozen and not frozen & set(state["module"]), role
        assert trained <= set(state["module"]) and state.get("frozen_param_fragments") is None
    tb = Trainer(load_config(None, [f"output.dir={tmp_path / 'a'}", *common, "output.resume=auto"]))
    assert tb.step == 2
    tb.finish(tb.train())
    resumed = [p.detach() for e in (tb.student, tb.teacher) for p in e.module.parameters()]
    assert all(torch.equal(p, q) for p, q in zip(resumed, full))

    out = tmp_path / "a"
    for role, engine in (("student", tb.student), ("teacher", tb.teacher)):
        adapter = json.loads((out / role / "adapter" / "adapter_config.json").read_text())
        assert adapter["peft_type"] == "LORA"
        assert "merged" in (out / role / "README.md").read_text()
        plain, info = AutoModelForSequenceClassification.from_pretrained(
            out / role, output_loading_info=True
        )
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        ids = torch.randint(5, 60, (3, 9), generator=torch.Generator().manual_seed(1))
        x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        engine.module.eval()
        plain.eval()
        with torch.no_grad():
            want = engine.module(**x).logits
            got = plain(**x).logits
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()


def test_decoder_lora_teacher_saves_the_adapter_folder(tmp_path, dist_env):
    """A decoder teacher with adapters at ZeRO-3 (partitioned base; only the adapters are
    gathered to save): the teacher folder is the adapter, equal to the live adapters; the
    student, without adapters, a plain model."""

    cfg = load_config(
        CAUSAL_LM_TINY,
        [
            f"output.dir={tmp_path / 'out'}",
            *TINY_LM,
            "model.teacher_peft.enabled=true",
            "deepspeed.teacher.zero_optimization.stage=3",
        ],
    )
    from safetensors.torch import load_file

    from lgtm_ds.training import Trainer

    tr = Trainer(cfg)
    tr.finish(tr.train())
    teacher, student = tmp_path / "out" / "teacher", tmp_path / "out" / "student"
    # the adapter folder holds the trained adapters, gathered from ZeRO-3's partitions
    import deepspeed

    module = tr.teacher.module
    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        live = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    saved_w = load_file(teacher / "adapter_model.safetensors")
    assert len(saved_w) == len(live) > 0
    for n, w in live.items():
        key = "base_model.model." + n.replace(".default.", ".")
        assert torch.equal(saved_w[key], w), n
    saved = json.loads((teacher / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "embedded:teacher"
    assert set(saved["target_modules"]) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }  # fmt: skip
    assert (teacher / "adapter_model.safetensors").exists()
    assert not (teacher / "model.safetensors").exists()
    assert "library_name: peft" in (teacher / "README.md").read_text()
    assert (student / "model.safetensors").exists()


@pytest.mark.slow
def test_tied_frozen_embedding_stays_out_of_checkpoints_and_resume_is_exact(tmp_path, dist_env):
    """A LoRA teacher with tied input / output embeddings (GPT-2): the frozen embedding is
    left out of its checkpoints under both of its names (``named_parameters()`` lists a tied
    weight once, the state dict twice), and the run resumed from them is the uninterrupted
    one, the tie intact."""
    from lgtm_ds.training import Trainer

    common = [
        *SMALL,
        "data.max_length=16",
        "model.teacher=embedded:gpt2-teacher",
        "model.student=embedded:gpt2-student",
        "model.teacher_peft.enabled=true",
        "train.max_steps=4",
        "output.checkpoint_every=2",
    ]
    cfg = [CAUSAL_LM_TINY, [f"output.dir={tmp_path / 'a'}", *common]]
    ta = Trainer(load_config(*cfg))
    ta.finish(ta.train())
    module = ta.teacher.module
    assert module.get_output_embeddings().weight is module.get_input_embeddings().weight
    frozen = {n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}
    assert "lm_head.weight" in frozen  # the tied alias, besides transformer.wte.weight
    (states,) = (tmp_path / "a" / "checkpoints" / "teacher" / "step2").glob("*model_states.pt")
    saved = set(torch.load(states, weights_only=False)["module"])
    assert saved and not frozen & saved, sorted(frozen & saved)
    full = [p.detach().clone() for e in (ta.student, ta.teacher) for p in e.module.parameters()]

    tb = Trainer(load_config(cfg[0], [*cfg[1], "output.resume=auto"]))
    assert tb.step == 2
    tb.finish(tb.train())
    module = tb.teacher.module
    assert module.get_output_embeddings().weight is module.get_input_embeddings().weight
    resumed = [p.detach() for e in (tb.student, tb.teacher) for p in e.module.parameters()]
    assert all(torch.equal(p, q) for p, q in zip(resumed, full))


def test_resuming_an_adapter_checkpoint_without_adapters_is_one_error(tmp_path, dist_env):
    """A checkpoint written with a LoRA teacher, resumed with the adapters switched off: one
    ConfigError naming the role and the key (not DeepSpeed's strict-load traceback), the run
    folder's lock released and its files untouched."""
    from lgtm_ds import ConfigError
    from lgtm_ds.training import Trainer

    common = [*TINY_LM, f"output.dir={tmp_path / 'a'}", "output.checkpoint_every=1"]
    lora = [*common, "train.max_steps=2", "model.teacher_peft.enabled=true"]
    ta = Trainer(load_config(CAUSAL_LM_TINY, lora))
    ta.finish(ta.train())
    out = tmp_path / "a"
    before = {name: (out / name).read_bytes() for name in ("config.yaml", "summary.json")}
    with pytest.raises(ConfigError, match=r"teacher checkpoint .* model\.teacher_peft"):
        Trainer(load_config(CAUSAL_LM_TINY, [*common, "train.max_steps=3", "output.resume=auto"]))
    assert (out / "run.lock").read_text() == ""  # released
    # the folder as the finished run left it: its config (not the failing one's), its summary
    assert {name: (out / name).read_bytes() for name in before} == before


def test_merge_at_zero3_that_cannot_fit_rank0_host_is_one_error_before_training(
    tmp_path, dist_env, monkeypatch
):
    """merge_adapters with a ZeRO-3 LoRA teacher: the merged model is assembled in rank 0's
    host memory; where that is too small the run stops at once, naming the key and the way
    out, and writes nothing."""
    from lgtm_ds import ConfigError
    from lgtm_ds.training import Trainer, trainer

    monkeypatch.setattr(trainer, "host_memory_available", lambda: 1 << 20)  # 1 MiB free
    cfg = load_config(
        CAUSAL_LM_TINY,
        [
            f"output.dir={tmp_path / 'out'}",
            *TINY_LM,
            "model.teacher_peft.enabled=true",
            "output.merge_adapters=true",
            "deepspeed.teacher.zero_optimization.stage=3",
        ],
    )
    with pytest.raises(ConfigError, match=r"output.merge_adapters: the merged teacher .* GiB\)"):
        Trainer(cfg)
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(trainer, "host_memory_available", lambda: None)  # unknown: no check
    Trainer(cfg)
