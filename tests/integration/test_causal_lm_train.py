"""Decoder distillation through the trainer: the example config end to end through the
deepspeed launcher (2 CPU ranks, ZeRO-3, bf16), the three methods, the options, and bad inputs
(one clear error each, no output folder)."""

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from lgtm_ds import DataError, ModelError
from lgtm_ds.config import load_config

from ..helpers import ROOT, run_deepspeed

EXAMPLE = f"{ROOT}/configs/examples/causal_lm_tiny.yaml"
SMALL = [
    "data.synthetic_examples=400",
    "train.micro_batch_size=8",
    "train.eval_batch_size=32",
    "train.log_every=1",
    "train.eval_every=0",
]


def _run(tmp_path, *overrides):
    from lgtm_ds.training import run

    cfg = load_config(EXAMPLE, [f"output.dir={tmp_path / 'out'}", *SMALL, *overrides])
    return run(cfg)


@pytest.mark.slow
def test_example_two_ranks_zero3_bf16(tmp_path):
    out = tmp_path / "run"
    proc = run_deepspeed(
        f"{ROOT}/launch/train.py",
        [
            "--config",
            EXAMPLE,
            "--ds_config",
            "ds_configs/zero3.json",
            "--train.precision=bf16",
            f"--output.dir={out}",
            "--train.max_steps=6",
            "--train.eval_every=3",
            "--data.synthetic_examples=600",
            "--train.eval_batch_size=64",
            "--method.influence_ratio_every=3",
            "--train.eval_generate=25",  # odd: rank 1 repeats a prompt; ZeRO-3: synced_gpus
            "--train.eval_max_new_tokens=12",
        ],
        2,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == 2 and s["precision"] == "bf16" and s["steps"] == 6
    assert s["zero_stage"] == {"teacher": 3, "student": 3}
    assert s["primary_metric"] == "perplexity"
    keys = {"student/ce", "student/perplexity", "teacher/ce", "teacher/perplexity"}
    pair = {"agreement/top1", "agreement/kl"}
    assert keys | pair <= set(s["final"]) <= set(s["initial"]) | pair
    assert s["final"]["agreement/kl"] > 0
    assert [e["step"] for e in s["evaluations"]] == [0, 3, 6]
    assert s["final"]["student/perplexity"] < s["initial"]["student/perplexity"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and rows[0]["eval"]
    train_rows = [r for r in rows if "influence_mean" in r]
    assert train_rows and all("influence_per_row" in r for r in train_rows)
    # the influence share, measured at steps 3 and 6 (bf16 ZeRO-3 teacher, 2 ranks)
    assert 0 < train_rows[-1]["influence_ratio"] < 1 and train_rows[-1]["step"] == 6
    infl = [json.loads(x) for x in (out / "influence.jsonl").read_text().splitlines()]
    assert {r["step"] for r in infl} == set(range(1, 7))
    per_step = len(infl) // 6
    assert per_step == 2 * 16 and len(infl) == 6 * per_step  # 2 ranks x the example's 16
    assert all(r["teacher_ce"] > 0 and r["student_ce"] > 0 for r in infl)
    assert len({r["index"] for r in infl if r["step"] == 1}) == per_step
    for role in ("student", "teacher"):
        model = AutoModelForCausalLM.from_pretrained(out / role)
        tok = AutoTokenizer.from_pretrained(out / role)
        assert tok.chat_template and model.config.vocab_size == len(tok)
    assert (out / "data_split.json").exists()
    # generation eval across 2 ZeRO-3 ranks: every prompt once, in order, scores = the file's
    for step in (0, 3, 6):
        gen = out / "generations" / f"step{step}.jsonl"
        rows = [json.loads(x) for x in gen.read_text().splitlines()]
        assert [r["eval_index"] for r in rows] == list(range(25))
        ev = next(e for e in s["evaluations"] if e["step"] == step)
        for role in ("student", "teacher"):
            share = sum(r[f"{role}_exact"] for r in rows) / 25
            assert ev[f"{role}/exact_match"] == pytest.approx(share)
            if step == 0:  # the random start completes with something
                assert all(r[role] for r in rows)


@pytest.mark.parametrize("method", ["vanilla_kd", "online_kd", "lgtm", "metadistil"])
def test_each_method_on_decoders(tmp_path, dist_env, method):
    s = _run(
        tmp_path,
        f"method.name={method}",
        "train.max_steps=3",
        "method.teacher_stage1_epochs=0.05",
        "method.jsd_beta=0.5",
        "method.teacher_jsd_beta=1.0",
    )
    assert s["steps"] == 3 and s["method"] == method
    assert s["fused_head"] == {"teacher": True, "student": True}  # every method, 0.9.1
    assert (s["stage1_steps"] > 0) == (method == "vanilla_kd")
    assert s["final"]["student/perplexity"] > 1


def test_options_group_by_length_and_gradient_checkpointing(tmp_path, dist_env):
    from lgtm_ds.data.loaders import LengthGroupedSampler
    from lgtm_ds.training import Trainer

    cfg = load_config(
        EXAMPLE,
        [
            f"output.dir={tmp_path / 'out'}",
            *SMALL,
            "train.max_steps=2",
            "data.group_by_length=true",
            "model.teacher_gradient_checkpointing=true",
            "model.student_gradient_checkpointing=true",
            "train.gradient_accumulation_steps=2",
        ],
    )
    tr = Trainer(cfg)
    assert isinstance(tr.train_batches.loader.sampler, LengthGroupedSampler)
    assert tr.teacher.module.is_gradient_checkpointing
    assert tr.student.module.is_gradient_checkpointing
    micro = tr.train_batches.next()
    lengths = [
        int(m["attention_mask"].sum(1).max()) - int(m["attention_mask"].sum(1).min()) for m in micro
    ]
    assert max(lengths) <= 2  # similar lengths within a micro-batch (random order: up to ~9)
    s = tr.finish(tr.train())
    assert s["steps"] == 2


def _files(tmp_path, rows):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return [
        "data.source=files",
        f"data.train_file={path}",
    ]


def test_prompt_completion_file_and_truncation_drops_are_counted(tmp_path, dist_env):
    rows = [{"prompt": "copy: red blue", "completion": "red blue"} for _ in range(120)]
    long = "reverse: " + " ".join(["red"] * 40)
    rows += [{"prompt": long, "completion": "red"} for _ in range(6)]  # completion cut away
    s = _run(tmp_path, *_files(tmp_path, rows), "data.max_length=16", "train.max_steps=2")
    dropped = s["dropped_by_truncation"]
    assert sum(dropped.values()) == 6, dropped


def test_every_completion_truncated_is_one_error_and_no_output(tmp_path, dist_env):
    long = "reverse: " + " ".join(["red"] * 40)
    rows = [{"prompt": long, "completion": "red"} for _ in range(30)]
    with pytest.raises(DataError, match="data.max_length"):
        _run(tmp_path, *_files(tmp_path, rows), "data.max_length=16")
    assert not (tmp_path / "out").exists()


def test_missing_completion_column_is_one_error(tmp_path, dist_env):
    rows = [{"prompt": "copy: red", "answer": "red"} for _ in range(30)]
    with pytest.raises(DataError, match="completion"):
        _run(tmp_path, *_files(tmp_path, rows), "data.format=prompt_completion")
    assert not (tmp_path / "out").exists()


def _saved_student(tmp_path, vocab_tokens=None):
    """A local decoder folder (config + weights + its own tokenizer)."""
    from lgtm_ds.data import build_tokenizer, synthetic_instruction_texts

    tok = build_tokenizer("embedded", synthetic_instruction_texts(400, 42), causal_lm=True)
    if vocab_tokens:
        tok.add_tokens(vocab_tokens)
    from ..helpers import tiny_decoder

    model = tiny_decoder("tiny", 0, vocab=len(tok))
    folder = tmp_path / "student_model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_local_student_with_the_same_tokenizer_trains(tmp_path, dist_env):
    folder = _saved_student(tmp_path)
    s = _run(tmp_path, f"model.student={folder}", "train.max_steps=1")
    assert s["steps"] == 1


def test_student_tokenizer_mismatch_is_one_error_and_no_output(tmp_path, dist_env):
    folder = _saved_student(tmp_path, vocab_tokens=["zzz-new-token"])
    with pytest.raises(ModelError, match="tokenizers of .* and student .* differ"):
        _run(tmp_path, f"model.student={folder}", "train.max_steps=1")
    assert not (tmp_path / "out").exists()


def test_classifier_for_a_decoder_task_is_one_error_and_no_output(tmp_path, dist_env):
    from ..helpers import tiny_model

    tiny_model().save_pretrained(tmp_path / "cls")
    with pytest.raises(ModelError, match="not a causal LM"):
        _run(tmp_path, f"model.teacher={tmp_path / 'cls'}", "model.tokenizer=embedded")
    assert not (tmp_path / "out").exists()


def test_teacher_offload_through_the_role_dict(tmp_path, dist_env):
    """A ZeRO-3 teacher with optimizer and parameter offload to CPU, DeepSpeed's own keys in
    deepspeed.teacher (the client AdamW needs zero_force_ds_cpu_optimizer: false)."""
    s = _run(
        tmp_path,
        "train.max_steps=2",
        "deepspeed.teacher={zero_optimization: {stage: 3, offload_optimizer: {device: cpu}, "
        "offload_param: {device: cpu}}, zero_force_ds_cpu_optimizer: false}",
    )
    assert s["steps"] == 2 and s["zero_stage"]["teacher"] == 3
    assert s["fused_head"] == {"teacher": True, "student": True}  # gathered from the CPU copy


def test_offloaded_zero3_student_takes_the_same_lgtm_steps(tmp_path, dist_env):
    """A ZeRO-3 student with parameter and optimizer offload to CPU: LGTM's influence passes
    run on its partitions (masters and moments read from the offloaded optimizer) and give the
    run of the same student without offload, bit for bit (on a CPU-only machine the devices
    coincide; what a GPU adds is the host-device copies, not covered here)."""
    from lgtm_ds.training.trainer import Trainer

    runs = {}
    for name, extra in (
        ("plain", ""),
        ("offload", "offload_optimizer: {device: cpu}, offload_param: {device: cpu}"),
    ):
        cfg = load_config(EXAMPLE, [
            f"output.dir={tmp_path / name}", *SMALL, "train.max_steps=3",
            f"deepspeed.student={{zero_optimization: {{stage: 3, {extra}}}, "
            "zero_force_ds_cpu_optimizer: false}",
        ])  # fmt: skip
        t = Trainer(cfg)
        t.finish(t.train())
        assert t.student.stage == 3 and t.student.zero3.partitioned is True  # no fallback
        rows = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        runs[name] = [{k: v for k, v in json.loads(r).items() if k != "time"} for r in rows]
    assert runs["offload"] == runs["plain"]
    assert any("influence_mean" in r for r in runs["plain"])
