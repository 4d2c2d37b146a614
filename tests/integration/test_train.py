"""The training run end to end: the README command through the deepspeed launcher (2 CPU
ranks), resume from a checkpoint, the three methods, and bad inputs (one clear error each,
no output folder that looks complete).

The runs (trainer, ranks, processes); the in-process tests:
``tests/unit/test_train.py``."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from lgtm_ds import ConfigError, DataError, ModelError
from lgtm_ds.config import load_config

from ..helpers import ROOT, clean_env, run_deepspeed

SMALL = [
    "data.synthetic_examples=400",
    "train.micro_batch_size=8",
    "train.eval_batch_size=64",
    "train.log_every=2",
]


def _deepspeed(args, ranks=2):
    return run_deepspeed(os.path.join(ROOT, "launch", "train.py"), args, ranks)


def _run(tmp_path, *overrides):
    from lgtm_ds.training import run

    cfg = load_config(None, [f"output.dir={tmp_path / 'out'}", *SMALL, *overrides])
    return run(cfg)


@pytest.mark.slow
def test_readme_command_two_ranks(tmp_path):
    out = tmp_path / "run"
    proc = _deepspeed(
        [
            "--ds_config",
            "ds_configs/zero2.json",
            f"--output.dir={out}",
            "--train.max_steps=12",
            "--train.eval_every=6",
            *[f"--{o}" for o in SMALL],
        ]
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 12
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert set(resolved) == {"experiment", "deepspeed_teacher", "deepspeed_student"}
    assert resolved["deepspeed_student"]["train_batch_size"] == 16  # 8 x 1 x 2 ranks
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r.get("eval")]
    assert [r["step"] for r in evals] == [0, 6, 12]  # step 0: before training
    assert all(0 <= r["student/accuracy"] <= 1 for r in evals)
    train_rows = [r for r in rows if not r.get("eval")]
    assert all(r["v_norm"] > 0 and "influence_mean" in r for r in train_rows)
    split = json.loads((out / "data_split.json").read_text())
    assert split["n_quiz"] == len(split["quiz_indices"]) > 0
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(out / "student")
    tok = AutoTokenizer.from_pretrained(out / "student")
    logits = model(**tok(["the battery is not bad at all"], return_tensors="pt")).logits
    assert logits.shape == (1, 3)
    assert (out / "teacher" / "config.json").exists()
    assert "LGTM-DS run: lgtm" in proc.stdout


@pytest.mark.slow
def test_resume_reproduces_an_uninterrupted_run(tmp_path, dist_env):
    from lgtm_ds.training import Trainer

    common = [
        *SMALL,
        "model.dropout=0.1",
        "train.max_steps=6",
        "train.eval_every=0",
        "output.checkpoint_every=3",
    ]
    a = load_config(None, [f"output.dir={tmp_path / 'a'}", *common])
    ta = Trainer(a)
    ta.finish(ta.train())
    full = [p.detach().clone() for p in ta.student.module.parameters()]
    teacher_full = [p.detach().clone() for p in ta.teacher.module.parameters()]
    assert (tmp_path / "a" / "checkpoints" / "latest").read_text() == "step3"

    b = load_config(None, [f"output.dir={tmp_path / 'a'}", *common, "output.resume=auto"])
    tb = Trainer(b)
    assert tb.step == 3
    tb.finish(tb.train())
    for p, q in zip(tb.student.module.parameters(), full):
        assert torch.equal(p, q)
    for p, q in zip(tb.teacher.module.parameters(), teacher_full):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "method,every,extra",
    [
        # 40 quiz rows / micro 8: the quiz loader finishes an epoch at step 5
        ("lgtm", 5, []),
        # 48 rows capped, 5 of them carved off as quiz: 43 / micro 8 = 5 batches per epoch
        ("online_kd", 5, ["data.max_train_examples=48"]),
    ],
    ids=["lgtm-quiz-epoch-boundary", "online-train-epoch-boundary"],
)
def test_resume_at_an_epoch_boundary_is_exact(tmp_path, dist_env, method, every, extra):
    """A checkpoint taken right after a loader finished an epoch: the resumed run equals the
    uninterrupted one bit for bit (the next epoch's loader must not draw from the global RNG
    that dropout uses)."""
    from lgtm_ds.training import Trainer

    common = [
        *SMALL,
        *extra,
        f"method.name={method}",
        "model.dropout=0.1",
        f"train.max_steps={every + 2}",
        "train.eval_every=0",
        f"output.checkpoint_every={every}",
    ]
    ta = Trainer(load_config(None, [f"output.dir={tmp_path / 'a'}", *common]))
    ta.finish(ta.train())
    full = [p.detach().clone() for e in (ta.student, ta.teacher) for p in e.module.parameters()]
    tb = Trainer(load_config(None, [f"output.dir={tmp_path / 'a'}", *common, "output.resume=auto"]))
    assert tb.step == every
    tb.finish(tb.train())
    resumed = [p.detach() for e in (tb.student, tb.teacher) for p in e.module.parameters()]
    assert all(torch.equal(p, q) for p, q in zip(resumed, full))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["online_kd", "vanilla_kd", "metadistil"])
def test_baseline_methods_train(tmp_path, dist_env, method):
    s = _run(
        tmp_path,
        f"method.name={method}",
        "train.max_steps=4",
        "train.eval_every=0",
        "method.teacher_stage1_epochs=0.1",
    )
    assert s["method"] == method and s["steps"] == 4
    assert (s["stage1_steps"] > 0) == (method == "vanilla_kd")
    assert (tmp_path / "out" / "summary.json").exists()


# -- bad inputs -------------------------------------------------------------------------------
def _no_complete_output(tmp_path):
    assert not (tmp_path / "out" / "summary.json").exists()


def test_unknown_config_key_through_the_cli(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "launch", "train.py"),
            f"--output.dir={tmp_path / 'out'}",
            "--train.micro_batchsize=4",
        ],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "train.micro_batchsize" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_console_is_quiet_unless_asked(tmp_path):
    """The default --log_level=warning: LGTM-DS's bar and summary, not the libraries' chatter."""
    env = clean_env()
    env.pop("DS_ACCELERATOR", None)
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "launch", "train.py"),
            f"--output.dir={tmp_path / 'out'}",
            *[f"--{o}" for o in SMALL],
            "--train.max_steps=1",
            "--train.eval_every=0",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout + proc.stderr
    assert "LGTM-DS run" in text
    for chatter in ("Setting accelerator", "[INFO]", "Map:", "Writing model shards", "Warning:"):
        assert chatter not in text, chatter
    from lgtm_ds.config import parse_args

    with pytest.raises(ConfigError, match="--log_level: invalid choice: 'loud'"):
        parse_args(["--log_level", "loud"])


def test_ds_json_conflicting_with_yaml(tmp_path, dist_env):
    bad = tmp_path / "ds.json"
    bad.write_text(
        json.dumps({"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 2}})
    )
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu.*train.micro_batch_size"):
        _run(tmp_path, f"deepspeed.config={bad}")
    _no_complete_output(tmp_path)
    assert not (tmp_path / "out").exists()


def test_teacher_student_label_count_mismatch(tmp_path, dist_env):
    from transformers import AutoModelForSequenceClassification

    from lgtm_ds.tasks.hf import embedded_bert_config

    path = tmp_path / "two_label_teacher"
    cfg = embedded_bert_config("tiny", vocab_size=1000, num_labels=2)
    cfg.architectures = ["BertForSequenceClassification"]
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(path)
    with pytest.raises(ModelError, match="teacher.*2-label.*3 labels"):
        _run(tmp_path, f"model.teacher={path}", "model.tokenizer=embedded")
    assert not (tmp_path / "out").exists()


def _csv(tmp_path, text, name="train.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_missing_text_column(tmp_path, dist_env):
    f = _csv(
        tmp_path,
        "sentence,label\n" + "".join(f"good movie {i},1\nbad film {i},0\n" for i in range(20)),
    )
    with pytest.raises(DataError, match="'text'"):
        _run(tmp_path, "data.source=files", f"data.train_file={f}", "model.tokenizer=embedded")
    assert not (tmp_path / "out").exists()


def test_missing_label_column(tmp_path, dist_env):
    f = _csv(tmp_path, "text,y\n" + "".join(f"good movie {i},1\n" for i in range(20)))
    with pytest.raises(DataError, match="'label'"):
        _run(tmp_path, "data.source=files", f"data.train_file={f}", "model.tokenizer=embedded")


def test_unknown_glue_task(tmp_path, dist_env):
    with pytest.raises(DataError, match="sst3"):
        _run(tmp_path, "data.source=glue", "data.task=sst3", "model.tokenizer=embedded")
    assert not (tmp_path / "out").exists()


def test_empty_dataset(tmp_path, dist_env):
    f = _csv(tmp_path, "text,label\n")
    with pytest.raises(DataError, match="empty|0 rows|no rows"):
        _run(tmp_path, "data.source=files", f"data.train_file={f}", "model.tokenizer=embedded")
    assert not (tmp_path / "out").exists()


def test_splits_smaller_than_one_batch_name_the_keys(tmp_path, dist_env):
    with pytest.raises(ConfigError, match="quiz split has 4 examples.*train.micro_batch_size=8"):
        _run(tmp_path, "data.quiz_fraction=0.01")
    with pytest.raises(ConfigError, match="train.micro_batch_size=8 x gradient_accumulation"):
        _run(tmp_path, "data.synthetic_examples=12", "data.quiz_fraction=0.5")
    assert not (tmp_path / "out").exists()


def test_finished_run_is_not_overwritten(tmp_path, dist_env):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match="output.overwrite"):
        _run(tmp_path)


@pytest.mark.slow
def test_local_hf_models_and_tokenizer(tmp_path, dist_env):
    """Bring your own models: save_pretrained folders for teacher, student and tokenizer."""
    from transformers import AutoModelForSequenceClassification

    from lgtm_ds import data as data_lib
    from lgtm_ds.tasks.hf import embedded_bert_config

    cfg = load_config(None, SMALL)
    tok = data_lib.build_tokenizer(
        "embedded", data_lib.synthetic_corpus_texts(cfg.data.synthetic_examples, 42)
    )
    paths = {}
    for role, size in (("teacher", "student"), ("student", "tiny")):
        mcfg = embedded_bert_config(size, vocab_size=len(tok), num_labels=3)
        mcfg.architectures = ["BertForSequenceClassification"]
        paths[role] = tmp_path / role
        AutoModelForSequenceClassification.from_config(mcfg).save_pretrained(paths[role])
    tok.save_pretrained(paths["teacher"])
    s = _run(
        tmp_path,
        f"model.teacher={paths['teacher']}",
        f"model.student={paths['student']}",
        "model.tokenizer=null",
        "train.max_steps=3",
        "train.eval_every=0",
    )
    assert s["steps"] == 3 and s["params"]["student"] < s["params"]["teacher"]


@pytest.mark.slow
def test_zero3_teacher_is_saved_whole_and_wandb_logs_offline(tmp_path, dist_env, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    from transformers import AutoModelForSequenceClassification

    from lgtm_ds.training import Trainer

    cfg = load_config(
        None,
        [
            f"output.dir={tmp_path / 'out'}",
            *SMALL,
            "train.max_steps=2",
            "train.eval_every=0",
            "output.wandb=true",
            "deepspeed.teacher.zero_optimization.stage=3",
        ],
    )
    tr = Trainer(cfg)
    assert tr.teacher.stage == 3 and tr.student.stage == 2
    tr.finish(tr.train())
    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "teacher")
    import deepspeed

    params = list(tr.teacher.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        live = {n: p.detach().clone() for n, p in tr.teacher.module.named_parameters()}
    for n, p in saved.named_parameters():
        assert p.shape == live[n].shape and torch.equal(p, live[n]), n
    assert list((tmp_path / "out" / "wandb").glob("offline-run-*"))


def test_bf16_zero3_lgtm_student_trains(tmp_path, dist_env):
    """A bf16 ZeRO-3 student: the influence passes run on fp32 tensors with the ZeRO-3 hooks
    off, so the perturbation is seen and the shards are never written."""
    s = _run(
        tmp_path,
        "train.precision=bf16",
        "train.max_steps=3",
        "train.eval_every=0",
        "deepspeed.student.zero_optimization.stage=3",
    )
    assert s["zero_stage"] == {"teacher": 2, "student": 3}


@pytest.mark.slow
def test_lgtm_with_zero3_teacher_and_zero3_student(tmp_path, dist_env):
    s = _run(
        tmp_path,
        "train.max_steps=3",
        "train.eval_every=0",
        "deepspeed.teacher.zero_optimization.stage=3",
        "deepspeed.student.zero_optimization.stage=3",
    )
    assert s["zero_stage"] == {"teacher": 3, "student": 3} and s["steps"] == 3
    from transformers import AutoModelForSequenceClassification

    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "student")
    assert all(p.numel() > 0 for p in student.parameters())


def test_bf16_lgtm_needs_a_zero2_teacher(tmp_path, dist_env):
    with pytest.raises(ConfigError, match="teacher at ZeRO stage 2 or 3"):
        _run(tmp_path, "train.precision=bf16", "deepspeed.teacher.zero_optimization.stage=1")
    assert not (tmp_path / "out").exists()
    # MetaDistil too once its teacher learns from its own CE beside the meta-gradient
    with pytest.raises(ConfigError, match="method metadistil .* ZeRO stage 2 or 3.*meta-gradient"):
        _run(tmp_path, "method.name=metadistil", "method.teacher_ce_weight=0.5",
             "train.precision=bf16", "deepspeed.teacher.zero_optimization.stage=1")  # fmt: skip
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_bf16_lgtm_run_accumulates_teacher_grads_in_fp32(tmp_path, dist_env):
    s = _run(tmp_path, "train.precision=bf16", "train.max_steps=2", "train.eval_every=0")
    assert s["precision"] == "bf16" and s["steps"] == 2
    resolved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert resolved["deepspeed_teacher"]["data_types"] == {"grad_accum_dtype": "fp32"}
    assert resolved["deepspeed_teacher"]["bf16"]["enabled"] is True


def test_fp16_lgtm_is_refused_with_a_reason(tmp_path, dist_env):
    with pytest.raises(ConfigError, match="fp16.*not supported yet"):
        _run(tmp_path, "train.precision=fp16")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_accumulation_through_the_trainer_updates_both_models(tmp_path, dist_env):
    """Distiller.step's overflow check reads the engine after the boundary micro-step."""
    _run(
        tmp_path,
        "train.max_steps=2",
        "train.eval_every=0",
        "train.log_every=1",
        "train.gradient_accumulation_steps=2",
        "train.micro_batch_size=4",
    )
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if not r.get("eval")]
    assert len(train_rows) == 2
    assert all("student_loss" in r and "skipped" not in r for r in train_rows)


@pytest.mark.slow
def test_regression_task_distills_with_mse(tmp_path, dist_env):
    """stsb-style data (float labels): one-output heads, MSE distillation, Pearson/Spearman."""
    rows = "".join(
        f"the film was {'great' if i % 3 else 'awful'} number {i},{(i % 5) + 0.5 * (i % 3)}\n"
        for i in range(120)
    )
    f = _csv(tmp_path, "text,label\n" + rows)
    s = _run(
        tmp_path,
        "data.source=files",
        f"data.train_file={f}",
        "model.tokenizer=embedded",
        "train.max_steps=3",
        "train.eval_every=0",
    )
    assert s["primary_metric"] in ("pearson", "spearman")
    assert {"student/pearson", "student/spearman", "teacher/pearson"} <= set(s["final"])
    from transformers import AutoModelForSequenceClassification

    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "student")
    assert student.config.num_labels == 1


def test_bad_resume_target_leaves_a_finished_run_alone(tmp_path, dist_env):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match="output.resume"):
        _run(tmp_path, f"output.resume={tmp_path / 'nope' / 'step3'}")
    with pytest.raises(ConfigError, match="output.resume=auto"):
        _run(tmp_path, "output.resume=auto")
    assert (out / "summary.json").read_text() == "{}"
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_label_names_are_saved_with_the_models(tmp_path, dist_env):
    """String labels from a file: id -> name in both saved models' config and data_split.json."""
    from transformers import AutoConfig

    rows = [
        {"text": f"review number {i} was {w}", "label": w}
        for i in range(120)
        for w in [["pos", "neg", "meh"][i % 3]]
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    _run(
        tmp_path,
        "data.source=files",
        f"data.train_file={path}",
        "train.max_steps=1",
        "train.eval_every=0",
    )
    want = {0: "meh", 1: "neg", 2: "pos"}
    for role in ("student", "teacher"):
        assert AutoConfig.from_pretrained(tmp_path / "out" / role).id2label == want
    split = json.loads((tmp_path / "out" / "data_split.json").read_text())
    assert split["label_names"] == ["meh", "neg", "pos"]


def test_outputs_have_normal_permissions(tmp_path, dist_env):
    import stat

    old = os.umask(0o022)
    try:
        _run(tmp_path, "train.max_steps=1", "train.eval_every=0")
    finally:
        os.umask(old)
    for name in ("config.yaml", "data_split.json", "summary.json"):
        assert stat.S_IMODE((tmp_path / "out" / name).stat().st_mode) == 0o644, name
    assert "summary.txt" in (tmp_path / "out" / "summary.txt").read_text()


def test_saved_models_have_a_model_card(tmp_path, dist_env):
    s = _run(tmp_path, "method.name=online_kd", "train.max_steps=2", "train.eval_every=0")
    for role in ("student", "teacher"):
        text = (tmp_path / "out" / role / "README.md").read_text()
        _, front, body = text.split("---\n", 2)
        meta = yaml.safe_load(front)
        assert meta["library_name"] == "transformers" and "lgtm-ds-online_kd" in meta["tags"]
        assert f"The **{role}**" in body and "method `online_kd`" in body
        assert "2 optimizer steps" in body and "`alpha_teacher: 0.4`" in body
        final = s["final"][f"student/{s['primary_metric']}"]
        assert f"| student/{s['primary_metric']} |" in body and f"{final:.4f}" in body
        from lgtm_ds import __version__

        assert f"LGTM-DS {__version__}" in body


def test_output_dir_that_is_a_file_or_unwritable_is_one_error(tmp_path, dist_env):
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        _run(tmp_path)
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    try:
        if os.access(tmp_path / "ro", os.W_OK):  # root ignores permissions
            pytest.skip("running as root: a read-only folder is still writable")
        from lgtm_ds.training import run

        with pytest.raises(ConfigError, match="cannot create or write"):
            run(load_config(None, [f"output.dir={tmp_path / 'ro' / 'run'}", *SMALL]))
    finally:
        (tmp_path / "ro").chmod(0o700)


def test_student_only_runs_through_the_trainer(tmp_path, dist_env):
    s = _run(tmp_path, "method.name=student_only", "train.max_steps=4", "train.eval_every=4")
    assert s["status"] == "completed" and s["stage1_steps"] == 0
    assert s["frozen"] == ["teacher"]  # never trained: built without an optimizer
    assert s["trainable_params"] == {"teacher": 0, "student": s["params"]["student"]}
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "student_loss" in r]
    assert steps and not any("teacher_loss" in r or "teacher_ce" in r for r in steps)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_vanilla_kd_without_stage1_distils_from_a_frozen_teacher(tmp_path, dist_env, precision):
    """teacher_stage1_epochs=0: no teacher step at all, and the teacher's engine has no
    optimizer (no fp32 master, no optimizer state): configured ZeRO-2 it runs at stage 0, at
    ZeRO-3 its parameters stay partitioned. Both give the student the same run; checkpoints hold
    a marker for the teacher instead of its weights."""
    from lgtm_ds.training import Trainer

    students, teachers = {}, {}
    for stage in (2, 3):
        cfg = load_config(
            None,
            [
                f"output.dir={tmp_path / f'z{stage}'}",
                *SMALL,
                "method.name=vanilla_kd",
                "method.vanilla_kd.teacher_stage1_epochs=0",
                f"train.precision={precision}",
                "train.max_steps=3",
                "train.eval_every=0",
                "output.checkpoint_every=2",
                f"deepspeed.teacher.zero_optimization.stage={stage}",
            ],
        )
        tr = Trainer(cfg)
        assert tr.teacher.frozen and not tr.student.frozen
        assert tr.teacher.engine.basic_optimizer is None
        assert tr.teacher.stage == (3 if stage == 3 else 0)
        assert tr.teacher.module_dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
        before = [p.detach().clone() for p in tr.student.module.parameters()]
        s = tr.finish(tr.train())
        assert s["status"] == "completed" and s["stage1_steps"] == 0 and s["steps"] == 3
        assert s["frozen"] == ["teacher"]
        assert "frozen, ZeRO-" in (tmp_path / f"z{stage}" / "summary.txt").read_text()
        ckpt = tmp_path / f"z{stage}" / "checkpoints"
        assert sorted(p.name for p in (ckpt / "teacher" / "step2").iterdir()) == ["frozen.json"]
        rows = [
            json.loads(x)
            for x in (tmp_path / f"z{stage}" / "metrics.jsonl").read_text().splitlines()
        ]
        assert not any(r.get("stage") == 1 for r in rows)
        students[stage] = [p.detach().clone() for p in tr.student.module.parameters()]
        moved = max((a - b).abs().max().item() for a, b in zip(before, students[stage]))
        assert moved > 1e-4
        teachers[stage] = s["final"]["teacher/accuracy"]
    # equal to run-to-run noise (two identical in-process runs here differ by ~6e-8)
    for a, b in zip(students[2], students[3]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6 if precision == "fp32" else 1e-2)
    assert teachers[2] == teachers[3]
