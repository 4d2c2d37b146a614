"""Generation-based evaluation of decoders (train.eval_generate): prompt/reference split,
greedy batched completion vs a hand-written greedy loop, word F1, the trainer's metrics and
generations files, bad input.

The runs (trainer, ranks, processes); the in-process tests:
``tests/unit/test_generation.py``."""

import json

import pytest

from lgtm_ds import ConfigError
from lgtm_ds.config import load_config
from lgtm_ds.tasks.generation import greedy_complete, prompt_and_reference

from ..helpers import ROOT

EXAMPLE = f"{ROOT}/configs/examples/causal_lm_tiny.yaml"


def _trainer(tmp_path, *overrides):
    from lgtm_ds.training.trainer import Trainer

    small = ["data.synthetic_examples=400", "train.micro_batch_size=8", "train.eval_every=0"]
    cfg = load_config(EXAMPLE, [f"output.dir={tmp_path / 'out'}", *small, *overrides])
    return Trainer(cfg)


def test_trainer_scores_and_writes_what_the_models_generate(tmp_path, dist_env):
    # lr 0: the models stay at their random start, whose completions are not empty (trained
    # for a few steps they first learn to end at once)
    t = _trainer(tmp_path, "train.max_steps=2", "train.eval_generate=10",
                 "train.eval_max_new_tokens=5", "train.eval_batch_size=4",
                 "train.student_lr=0", "train.teacher_lr=0",
                 "train.best_metric=exact_match")  # fmt: skip
    s = t.finish(t.train())
    out = tmp_path / "out"
    files = sorted(p.name for p in (out / "generations").iterdir())
    assert files == ["step0.jsonl", "step2.jsonl"]
    rows = [json.loads(x) for x in (out / "generations" / "step2.jsonl").read_text().splitlines()]
    assert [r["eval_index"] for r in rows] == t.evaluator.gen_rows and len(rows) == 10
    assert all(r["student"] and r["teacher"] for r in rows)
    for role in ("student", "teacher"):
        assert s["final"][f"{role}/exact_match"] == pytest.approx(
            sum(r[f"{role}_exact"] for r in rows) / 10
        )
        assert s["final"][f"{role}/gen_f1"] == pytest.approx(
            sum(r[f"{role}_f1"] for r in rows) / 10
        )
        # the file holds what the trained model completes (batches of 4, left-padded)
        ev, model = t.data.eval, getattr(t, role).module.eval()
        for r in rows:
            prompt, ref = prompt_and_reference(ev[r["eval_index"]]["input_ids"],
                                               ev[r["eval_index"]]["labels"])  # fmt: skip
            (ids,) = greedy_complete(model, [prompt], pad_id=t.collate.pad_id,
                                     eos_id=t.tokenizer.eos_token_id, max_new_tokens=5)  # fmt: skip
            assert r[role] == t.tokenizer.decode(ids, skip_special_tokens=True).strip()
            assert r["reference"] == t.tokenizer.decode(ref, skip_special_tokens=True).strip()
    assert "generations/" in (out / "summary.txt").read_text()
    # train.best_metric: the best evaluation by exact match (higher is better)
    assert s["primary_metric"] == "exact_match" and s["lower_is_better"] is False
    assert s["best_student"] == max(h["student/exact_match"] for h in s["evaluations"][1:])


def test_best_metric_must_be_one_the_run_reports(tmp_path, dist_env):
    from lgtm_ds.training import run

    with pytest.raises(ConfigError, match="best_metric='exact_match'.*need train.eval_generate"):
        _trainer(tmp_path, "train.best_metric=exact_match")
    with pytest.raises(ConfigError, match="best_metric='perplexity' is not .* accuracy"):
        run(load_config(None, [f"output.dir={tmp_path / 'a'}", "train.best_metric=perplexity"]))
    assert not (tmp_path / "out").exists() and not (tmp_path / "a").exists()
    s = run(load_config(None, [f"output.dir={tmp_path / 'b'}", "train.max_steps=2",
                               "train.eval_every=1", "train.best_metric=accuracy"]))  # fmt: skip
    assert s["primary_metric"] == "accuracy"


def test_generation_eval_needs_a_decoder_and_prompts(tmp_path, dist_env):
    from lgtm_ds.training import run

    with pytest.raises(ConfigError, match="train.eval_generate=4 is for decoders"):
        run(load_config(None, [f"output.dir={tmp_path / 'a'}", "train.eval_generate=4"]))
    assert not (tmp_path / "a").exists()
    path = tmp_path / "train.jsonl"  # plain text: the loss starts at the first token
    path.write_text("".join(json.dumps({"text": "red blue green"}) + "\n" for _ in range(60)))
    with pytest.raises(ConfigError, match="no held-out example has a prompt.*data.format text"):
        _trainer(tmp_path, "data.source=files", f"data.train_file={path}", "train.eval_generate=4")
    assert not (tmp_path / "out").exists()
