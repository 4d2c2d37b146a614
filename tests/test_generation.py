"""Generation-based evaluation of decoders (train.eval_generate): prompt/reference split,
greedy batched completion vs a hand-written greedy loop, word F1, the trainer's metrics and
generations files, bad input."""

import json

import pytest
import torch

from lgtm_ds import ConfigError
from lgtm_ds.config import load_config
from lgtm_ds.tasks.generation import greedy_complete, prompt_and_reference, word_f1

from .helpers import ROOT, tiny_decoder

EXAMPLE = f"{ROOT}/configs/examples/causal_lm_tiny.yaml"


def test_prompt_and_reference_take_the_first_loss_span():
    ids = [1, 5, 6, 7, 8, 2, 9, 10, 11, 2]
    labels = [-100, -100, -100, 7, 8, 2, -100, -100, 11, 2]  # two assistant turns
    assert prompt_and_reference(ids, labels) == ([1, 5, 6], [7, 8, 2])
    assert prompt_and_reference(ids, ids) is None  # text format: the loss starts at token 0
    assert prompt_and_reference(ids, [-100] * len(ids)) is None


def test_word_f1():
    assert word_f1("a b c", "a b c") == 1.0
    assert word_f1("a b d", "a b c") == pytest.approx(2 / 3)
    assert word_f1("a a", "a") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert word_f1("", "") == 1.0 and word_f1("x", "") == 0.0 and word_f1("x", "y") == 0.0


def _greedy_by_hand(model, prompt, eos, n_new):
    ids = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        for _ in range(n_new):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            if nxt == eos:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


@pytest.mark.parametrize("name", ["gpt2-student", "student"])  # absolute and rotary positions
def test_batched_left_padded_completion_equals_one_prompt_at_a_time(name):
    model = tiny_decoder(name, seed=3).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 50, (k,), generator=g).tolist() for k in (3, 7, 5, 1)]
    # an EOS the random model emits for some prompts: the most likely first token of prompt 0
    with torch.no_grad():
        eos = int(model(input_ids=torch.tensor([prompts[0]])).logits[0, -1].argmax())
    got = greedy_complete(model, prompts, pad_id=0, eos_id=eos, max_new_tokens=6)
    want = [_greedy_by_hand(model, p, eos, 6) for p in prompts]
    assert got == want
    assert got[0] == [] and any(len(x) == 6 for x in got)  # stopped at EOS / at the limit


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


def test_messages_prompt_is_the_chat_up_to_the_first_assistant_turn():
    """``messages`` data: the prompt ends with the first assistant header (the rendered
    generation prompt), the reference is that turn (its end-of-turn token included)."""
    import datasets

    from lgtm_ds import data as D
    from lgtm_ds.tasks.lm_data import LMFormat, encode_lm

    from .test_lm_data import _chat

    tok = D.build_tokenizer("embedded", D.synthetic_instruction_texts(300, 0), causal_lm=True)
    enc, _ = encode_lm(datasets.Dataset.from_dict({"messages": [_chat()]}), tok,
                       LMFormat("messages"), max_length=64)  # fmt: skip
    prompt, ref = prompt_and_reference(enc[0]["input_ids"], enc[0]["labels"])
    assert prompt[-1] == tok.convert_tokens_to_ids("<|assistant|>")
    assert tok.decode(ref) == "red cat </s>"  # the second turn ("moon sun") is not in it
    assert tok.decode(ref, skip_special_tokens=True).strip() == "red cat"
