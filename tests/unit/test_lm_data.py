"""The data side of causal-LM distillation: formats, loss masks, truncation, collation, the
embedded decoder tokenizer, the synthetic instruction task, hub / files sources, length-grouped
batches."""

import json

import datasets
import numpy as np
import pandas as pd
import pytest
import torch

from lgtm_ds import data as D
from lgtm_ds.config import DataConfig
from lgtm_ds.data import sources
from lgtm_ds.data.synthetic_lm import make_instruction_corpus
from lgtm_ds.errors import ConfigError, DataError
from lgtm_ds.tasks.lm_data import CausalLMCollator, LMFormat, encode_lm, resolve_format

IGN = -100


@pytest.fixture(scope="module")
def tok():
    return D.build_tokenizer("embedded", D.synthetic_instruction_texts(300, 0), causal_lm=True)


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _lm_cfg(**kw):
    return DataConfig(task_type="causal_lm", **kw)


def _write(path, rows):
    if path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    elif path.suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        pd.DataFrame(rows).to_parquet(path)
    return str(path)


def _pc_rows(n, long_every=0):
    rows = []
    for i in range(n):
        prompt = (
            "copy: red cat" if not (long_every and i % long_every == 0) else "copy:" + (" red" * 30)
        )
        rows.append({"prompt": prompt, "completion": f"red cat {i % 3}", "extra": i})
    return rows


def _chat(i=0):
    return [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": f"copy: red cat {i}"},
        {"role": "assistant", "content": "red cat"},
        {"role": "user", "content": "reverse: sun moon"},
        {"role": "assistant", "content": "moon sun"},
    ]


# ------------------------------------------------------------------------------ tokenizer


def test_decoder_tokenizer_specials_template_and_round_trip(tok, tmp_path):
    from transformers import AutoTokenizer

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    assert tok.convert_tokens_to_ids(specials) == list(range(7))
    assert (tok.pad_token, tok.eos_token, tok.bos_token) == ("<pad>", "</s>", "<s>")
    assert tok.padding_side == "right" and tok.model_input_names == ["input_ids", "attention_mask"]
    assert 300 <= len(tok) <= 2000
    enc = tok("reverse: sun moon")
    assert enc["input_ids"][0] == tok.bos_token_id and "token_type_ids" not in enc
    assert tok.unk_token_id not in enc["input_ids"]
    # every word of the task is one token
    assert len(_ids(tok, "next after: seventeen")) == 4
    text = tok.apply_chat_template(_chat()[1:3], tokenize=False)
    assert text == "<s><|user|> copy: red cat 0 </s><|assistant|> red cat </s>"
    gen = tok.apply_chat_template(_chat()[1:2], tokenize=False, add_generation_prompt=True)
    assert gen.endswith("</s><|assistant|>")
    tok.save_pretrained(tmp_path / "tok")
    again = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert again.chat_template == tok.chat_template
    assert again.apply_chat_template(_chat(), tokenize=False) == tok.apply_chat_template(
        _chat(), tokenize=False
    )
    assert again("copy: red cat")["input_ids"] == tok("copy: red cat")["input_ids"]
    assert again.get_vocab() == tok.get_vocab() and again.pad_token_id == 0
    assert again.eos_token_id == 3 and again.bos_token_id == 2
    # deterministic build; the encoder tokenizer is unchanged by the flag's default
    tok2 = D.build_tokenizer("embedded", D.synthetic_instruction_texts(300, 0), causal_lm=True)
    assert tok2.get_vocab() == tok.get_vocab()
    assert D.build_tokenizer("embedded", ["a b"]).cls_token == "[CLS]"


# ------------------------------------------------------------------------------ synthetic task


def test_synthetic_instruction_splits(tok):
    tr, ev = D.synthetic_instruction_splits(500, 3)
    tr2, ev2 = D.synthetic_instruction_splits(500, 3)
    assert tr == tr2 and ev == ev2 and set(tr) == {"prompt", "completion"}
    assert len(tr["prompt"]) == 500 and len(ev["prompt"]) == 100
    assert len(D.synthetic_instruction_splits(3000, 3)[1]["prompt"]) == 300
    assert D.synthetic_instruction_splits(500, 4)[0] != tr
    kinds = {p.split(":")[0] for p in tr["prompt"]}
    assert kinds == {"copy", "reverse", "last", "next after", "opposite of"}
    for p, c in zip(tr["prompt"], tr["completion"]):  # the completion is a function of the prompt
        kind, words = p.split(": ")
        words = words.split()
        if kind == "copy":
            assert c.split() == words
        elif kind == "reverse":
            assert c.split() == words[::-1]
        elif kind == "last":
            assert c == words[-1]
        n = len(tok(p)["input_ids"]) + len(_ids(tok, c)) + 1
        assert n <= 12, (p, c)
    # the list templates rarely repeat between train and eval (the lookups do by design)
    seen = set(tr["prompt"])
    lists = [p for p in ev["prompt"] if p.split(":")[0] in ("copy", "reverse")]
    assert sum(p in seen for p in lists) / len(lists) < 0.2
    assert D.synthetic_instruction_texts(500, 3)[0] == f"{tr['prompt'][0]} {tr['completion'][0]}"
    with pytest.raises(DataError, match="positive"):
        make_instruction_corpus(0, 0)


# ------------------------------------------------------------------------------ formats


def test_resolve_format_auto_and_missing_columns():
    kw = dict(where="train.jsonl")
    assert resolve_format("auto", ["messages", "prompt", "completion"], **kw).kind == "messages"
    assert resolve_format("auto", ["prompt", "completion", "x"], **kw).kind == "prompt_completion"
    assert resolve_format("auto", ["prompt", "text"], **kw).kind == "text"
    f = resolve_format("auto", ["q", "a"], prompt_column="q", completion_column="a", **kw)
    assert f == LMFormat("prompt_completion", prompt_column="q", completion_column="a")
    cases = [
        ("auto", ["prompt", "body"], "'text'.*data.text_columns.*train.jsonl.*'prompt', 'body'"),
        ("auto", ["prompt"], "auto found no format.*'messages'.*'prompt' and 'completion'.*'text'"),
        ("text", ["body"], "format 'text'.*'text'.*data.text_columns.*train.jsonl"),
        ("prompt_completion", ["prompt"], "'completion'.*data.completion_column.*train.jsonl"),
        ("prompt_completion", ["completion"], "'prompt'.*data.prompt_column.*train.jsonl"),
        ("messages", ["text"], "'messages'.*data.messages_column.*train.jsonl.*\\['text'\\]"),
    ]
    for requested, cols, pattern in cases:
        with pytest.raises(DataError, match=pattern):
            resolve_format(requested, cols, **kw)


def test_text_format_labels_every_token_and_appends_eos(tok):
    ds = datasets.Dataset.from_dict({"text": ["copy: red cat", "red cat </s>"]})
    enc, dropped = encode_lm(ds, tok, LMFormat("text"), max_length=64)
    assert dropped == 0
    ids = [tok.bos_token_id, *_ids(tok, "copy: red cat"), tok.eos_token_id]
    assert enc[0]["input_ids"] == ids and enc[0]["labels"] == ids
    assert enc[0]["attention_mask"] == [1] * len(ids)
    assert enc[1]["input_ids"].count(tok.eos_token_id) == 1  # not appended twice
    assert enc.column_names == ["input_ids", "attention_mask", "labels"]


def test_prompt_completion_masks_the_prompt(tok):
    ds = datasets.Dataset.from_dict({"q": ["reverse: sun moon", ""], "a": ["moon sun", "red"]})
    fmt = LMFormat("prompt_completion", prompt_column="q", completion_column="a")
    enc, _ = encode_lm(ds, tok, fmt, max_length=64)
    p = [tok.bos_token_id, *_ids(tok, "reverse: sun moon")]
    c = [*_ids(tok, "moon sun"), tok.eos_token_id]
    assert enc[0]["input_ids"] == p + c
    assert enc[0]["labels"] == [IGN] * len(p) + c
    assert enc[1]["labels"] == [IGN, *_ids(tok, "red"), tok.eos_token_id]  # empty prompt: BOS


def test_messages_loss_on_assistant_turns_only(tok):
    ds = datasets.Dataset.from_dict({"messages": [_chat()]})
    enc, dropped = encode_lm(ds, tok, LMFormat("messages"), max_length=64)
    assert dropped == 0
    ids, labels = enc[0]["input_ids"], enc[0]["labels"]
    assert (
        ids
        == tok(tok.apply_chat_template(_chat(), tokenize=False), add_special_tokens=False)[
            "input_ids"
        ]
    )
    kept = [i for i, x in enumerate(labels) if x != IGN]
    assert [labels[i] for i in kept] == [ids[i] for i in kept]
    assert tok.decode([ids[i] for i in kept]) == "red cat </s> moon sun </s>"
    assistant = tok.convert_tokens_to_ids("<|assistant|>")
    for i in kept:  # each loss token follows an assistant header within its turn
        assert assistant in ids[:i]
    # the tokens of the system and user turns and the role headers carry no loss
    first = kept[0]
    assert ids[first - 1] == assistant and all(x == IGN for x in labels[:first])
    # a JSON string (e.g. a csv cell) is parsed
    ds = datasets.Dataset.from_dict({"messages": [json.dumps(_chat(1)[1:3])]})
    enc, _ = encode_lm(ds, tok, LMFormat("messages"), max_length=64)
    assert tok.decode([t for t in enc[0]["labels"] if t != IGN]) == "red cat </s>"


def test_messages_need_a_chat_template(tok):
    plain = D.build_tokenizer("embedded", ["a b"], causal_lm=True)
    plain.chat_template = None
    ds = datasets.Dataset.from_dict({"messages": [_chat()]})
    with pytest.raises(DataError, match="no chat template.*'messages'.*chat template"):
        encode_lm(ds, plain, LMFormat("messages"), max_length=64)
    bad_role = [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]
    with pytest.raises(DataError, match="'messages' row 0.*chat template.*role"):
        encode_lm(
            datasets.Dataset.from_dict({"messages": [bad_role]}),
            tok,
            LMFormat("messages"),
            max_length=64,
        )
    no_answer = [{"role": "user", "content": "x"}]
    with pytest.raises(DataError, match="'messages' row 0: no assistant"):
        encode_lm(
            datasets.Dataset.from_dict({"messages": [no_answer]}),
            tok,
            LMFormat("messages"),
            max_length=64,
        )


def test_empty_or_missing_text_names_column_and_row(tok):
    ds = datasets.Dataset.from_dict({"text": ["red cat", "red", "  "]})
    with pytest.raises(DataError, match="column 'text': empty text in row 2"):
        encode_lm(ds, tok, LMFormat("text"), max_length=64)
    ds = datasets.Dataset.from_dict({"prompt": ["a", "b"], "completion": ["x", None]})
    with pytest.raises(DataError, match="column 'completion': missing text in row 1"):
        encode_lm(ds, tok, LMFormat("prompt_completion"), max_length=64)


def test_truncation_drops_rows_without_loss_tokens(tok):
    ds = datasets.Dataset.from_list(_pc_rows(9, long_every=3))  # rows 0, 3, 6: 32-token prompts
    fmt = LMFormat("prompt_completion")
    enc, dropped = encode_lm(ds.select_columns(["prompt", "completion"]), tok, fmt, max_length=16)
    assert dropped == 3 and len(enc) == 6
    assert max(len(x) for x in enc["input_ids"]) <= 16
    # the training split's source_index follows the rows kept, into the batches
    ds_i = ds.select_columns(["prompt", "completion"]).add_column("source_index", range(9))
    enc_i, _ = encode_lm(ds_i, tok, fmt, max_length=16)
    assert enc_i["source_index"] == [1, 2, 4, 5, 7, 8]
    assert enc_i["input_ids"] == enc["input_ids"]
    b = CausalLMCollator(tok)([enc_i[0], enc_i[3]])
    assert b["source_index"].tolist() == [1, 5]
    # a row truncated inside its completion keeps its start and the loss tokens left
    enc, dropped = encode_lm(ds, tok, fmt, max_length=6)  # BOS + 4 prompt tokens + "red"
    assert dropped == 3 and all(len(x) == 6 for x in enc["input_ids"])
    assert enc[0]["labels"] == [IGN] * 5 + _ids(tok, "red")
    with pytest.raises(DataError, match="all 9 rows.*data.max_length=5"):
        encode_lm(ds, tok, fmt, max_length=5)


# ------------------------------------------------------------------------------ collation


def test_collator_pads_right_with_ignore_labels(tok):
    ds = datasets.Dataset.from_dict(
        {"prompt": ["copy: red", "copy: red cat sun"], "completion": ["red", "x"]}
    )
    enc, _ = encode_lm(ds, tok, LMFormat("prompt_completion"), max_length=64)
    rows = [enc[0], enc[1]]
    b = CausalLMCollator(tok)(rows)
    n0, n1 = len(rows[0]["input_ids"]), len(rows[1]["input_ids"])
    assert b["input_ids"].shape == (2, n1) and n0 < n1
    assert b["input_ids"].dtype == b["labels"].dtype == torch.long
    assert b["input_ids"][0, n0:].tolist() == [tok.pad_token_id] * (n1 - n0)
    assert b["attention_mask"][0].tolist() == [1] * n0 + [0] * (n1 - n0)
    assert b["labels"][0].tolist() == rows[0]["labels"] + [IGN] * (n1 - n0)
    assert b["labels"][1].tolist() == rows[1]["labels"]
    assert CausalLMCollator(tok, pad_to_multiple_of=8)(rows)["input_ids"].shape == (2, 8)
    no_pad = D.build_tokenizer("embedded", ["a b"], causal_lm=True)
    no_pad.pad_token = None
    padded = CausalLMCollator(no_pad)(rows)["input_ids"][0, n0:]
    assert padded.tolist() == [no_pad.eos_token_id] * (n1 - n0)


# ------------------------------------------------------------------------------ load_task


def test_load_task_synthetic_causal_lm(tok):
    cfg = _lm_cfg(synthetic_examples=400, max_length=64)
    td = D.load_task(cfg, tok, seed=5)
    assert td.name == "synthetic_instruction" and td.task.name == "causal_lm"
    assert td.task.num_labels is None and td.task.metric_names == ["ce", "perplexity"]
    assert td.task.lm_format == LMFormat("prompt_completion")
    assert len(td.train) == 360 and len(td.quiz) == 40 and len(td.eval) == 100
    train, _ = D.synthetic_instruction_splits(400, 5)
    i = td.quiz_indices[0]
    p = [tok.bos_token_id, *_ids(tok, train["prompt"][i])]
    c = [*_ids(tok, train["completion"][i]), tok.eos_token_id]
    assert td.quiz[0]["input_ids"] == p + c and td.quiz[0]["labels"] == [IGN] * len(p) + c
    rec = td.split_record()
    assert rec["task_type"] == "causal_lm"
    assert rec["dropped_by_truncation"] == {"train": 0, "quiz": 0, "eval": 0}
    with pytest.raises(ConfigError, match="data.format='text'.*prompt_completion"):
        D.load_task(_lm_cfg(format="text"), tok, 0)
    # a tokenizer without a pad token pads with its EOS from here on
    no_pad = D.build_tokenizer("embedded", D.synthetic_instruction_texts(300, 0), causal_lm=True)
    no_pad.pad_token = None
    D.load_task(_lm_cfg(synthetic_examples=200), no_pad, seed=0)
    assert no_pad.pad_token == "</s>" and no_pad.pad_token_id == no_pad.eos_token_id


@pytest.mark.parametrize("ext", [".jsonl", ".parquet", ".csv"])
def test_load_task_files_causal_lm(tok, tmp_path, ext):
    tr = _write(tmp_path / f"lm{ext}", _pc_rows(40, long_every=4))
    cfg = _lm_cfg(source="files", train_file=tr, max_length=16, quiz_fraction=0.25)
    td = D.load_task(cfg, tok, seed=1)
    assert td.name == "lm" and td.task.lm_format.kind == "prompt_completion"
    assert len(td.eval_indices) == 4
    dropped = td.split_record()["dropped_by_truncation"]
    # rows 0, 4, 8, ... cannot keep a completion token within 16 tokens: 10 of 40 rows
    assert sum(dropped.values()) == 10
    assert len(td.train) + len(td.quiz) + len(td.eval) == 30
    assert len(td.quiz) == 9 - dropped["quiz"] and len(td.eval) == 4 - dropped["eval"]


def test_load_task_files_messages_and_text(tok, tmp_path):
    rows = [{"messages": _chat(i), "id": i} for i in range(20)]
    tr = _write(tmp_path / "chat.parquet", rows)
    va = _write(tmp_path / "chat_val.jsonl", rows[:5])
    td = D.load_task(_lm_cfg(source="files", train_file=tr, validation_file=va), tok, 0)
    assert td.task.lm_format.kind == "messages" and len(td.eval) == 5
    assert tok.decode([t for t in td.eval[0]["labels"] if t != IGN]) == "red cat </s> moon sun </s>"
    tr = _write(tmp_path / "plain.csv", [{"body": f"red cat {i}"} for i in range(20)])
    cfg = _lm_cfg(source="files", train_file=tr, text_columns=["body"], quiz_source="validation")
    td = D.load_task(cfg, tok, 0)
    assert td.task.lm_format == LMFormat("text", text_column="body")
    assert td.quiz is td.eval and td.split_record()["dropped_by_truncation"]["quiz"] == 0


def test_load_task_causal_lm_errors(tok, tmp_path):
    tr = _write(tmp_path / "pc.jsonl", _pc_rows(20))
    cfg = _lm_cfg(source="files", train_file=tr, format="messages")
    with pytest.raises(DataError, match="'messages'.*data.messages_column.*pc.jsonl"):
        D.load_task(cfg, tok, 0)
    cfg = _lm_cfg(source="files", train_file=tr, completion_column="answer")
    with pytest.raises(DataError, match="'text'.*data.text_columns.*pc.jsonl"):  # auto: text
        D.load_task(cfg, tok, 0)
    cfg = _lm_cfg(
        source="files", train_file=tr, format="prompt_completion", completion_column="answer"
    )
    with pytest.raises(DataError, match="'answer'.*data.completion_column.*pc.jsonl"):
        D.load_task(cfg, tok, 0)
    rows = _pc_rows(20)
    rows[7]["completion"] = " "  # row 7: line 8 of the file
    bad = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match="column 'completion' of .*bad.jsonl: empty text at line 8"):
        D.load_task(_lm_cfg(source="files", train_file=bad), tok, 0)
    va = _write(tmp_path / "val.jsonl", [{"prompt": "a"}] * 3)
    with pytest.raises(DataError, match="'completion'.*val.jsonl"):
        D.load_task(_lm_cfg(source="files", train_file=tr, validation_file=va), tok, 0)
    # every row dropped: names the split and data.max_length
    long = _write(tmp_path / "long.jsonl", _pc_rows(20, long_every=1))
    cfg = _lm_cfg(source="files", train_file=long, max_length=8)
    with pytest.raises(DataError, match="eval split of 'long'.*data.max_length=8"):
        D.load_task(cfg, tok, 0)
    with pytest.raises(ConfigError, match="data.source='glue'.*causal_lm"):
        D.load_task(_lm_cfg(source="glue", task="sst2"), tok, 0)


def _fake_hub(splits):
    calls = []

    def load(path, name=None, split=None, **kw):
        calls.append((path, name, split))
        if split not in splits:
            raise ValueError(f'Unknown split "{split}". Should be one of {list(splits)}.')
        return datasets.Dataset.from_dict(splits[split])

    return load, calls


def test_hub_source_causal_lm_and_classification(tok, monkeypatch):
    pc = {k: [r[k] for r in _pc_rows(30)] for k in ("prompt", "completion")}
    load, calls = _fake_hub({"train": pc, "test": {k: v[:6] for k, v in pc.items()}})
    monkeypatch.setattr(sources, "LOAD_DATASET", load)
    cfg = _lm_cfg(source="hub", dataset="me/instr", dataset_config="v1", eval_split="test")
    td = D.load_task(cfg, tok, 0)
    assert calls == [("me/instr", "v1", "train"), ("me/instr", "v1", "test")]
    assert td.name == "me/instr" and len(td.eval) == 6 and td.eval_indices == []
    # classification through the hub source (labels encoded as for files), eval carved
    rows = {"sentence": [f"red cat {i}" for i in range(30)], "label": [i % 2 for i in range(30)]}
    load, calls = _fake_hub({"train": rows})
    cfg = DataConfig(source="hub", dataset="me/cls", text_columns=["sentence"])
    enc_tok = D.build_tokenizer("embedded", D.synthetic_corpus_texts(50, 0))
    td = D.load_task(cfg, enc_tok, 0, _load_dataset=load)
    assert td.task.name == "classification" and td.num_labels == 2 and len(td.eval_indices) == 3
    assert calls == [("me/cls", None, "train")]


def test_hub_source_errors(tok, monkeypatch):
    def offline(*a, **k):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(sources, "LOAD_DATASET", offline)
    cfg = _lm_cfg(source="hub", dataset="me/instr")
    with pytest.raises(DataError, match="data.dataset='me/instr'.*unreachable.*no route to host"):
        D.load_task(cfg, tok, 0)
    load, _ = _fake_hub({"train": {"prompt": ["a"] * 20, "completion": ["b"] * 20}})
    monkeypatch.setattr(sources, "LOAD_DATASET", load)
    with pytest.raises(DataError, match="data.eval_split='dev'.*Unknown split"):
        D.load_task(_lm_cfg(source="hub", dataset="me/instr", eval_split="dev"), tok, 0)
    with pytest.raises(DataError, match="'label'.*dataset 'me/instr' split 'train'"):
        D.load_task(DataConfig(source="hub", dataset="me/instr", text_columns=["prompt"]), tok, 0)


def test_config_keys_and_errors():
    cfg = DataConfig()
    assert cfg.task_type is None and cfg.format == "auto" and cfg.group_by_length is False
    assert (cfg.train_split, cfg.eval_split, cfg.dataset) == ("train", None, None)
    with pytest.raises(ConfigError, match="data.dataset.*'hub'"):
        DataConfig(source="hub")
    with pytest.raises(ConfigError, match="data.task_type.*causal_lm.*'causal'"):
        DataConfig(task_type="causal")
    with pytest.raises(ConfigError, match="data.format.*one of"):
        DataConfig(format="chat")
    with pytest.raises(ConfigError, match="data.format='text' applies to.*causal_lm"):
        DataConfig(task_type="classification", format="text")


# ------------------------------------------------------------------------------ length grouping


def _len_ds(n, seed=0):
    lengths = np.random.default_rng(seed).integers(2, 60, size=n).tolist()
    return datasets.Dataset.from_dict({"idx": list(range(n)), "n": lengths}), lengths


def _collate(rows):
    return {
        "idx": torch.tensor([r["idx"] for r in rows]),
        "n": torch.tensor([r["n"] for r in rows]),
    }


def _batches(ds, lengths, steps, *, rank=0, world=1, gas=2, state=None):
    gb = D.GlobalBatches(
        ds,
        micro_batch_size=4,
        gradient_accumulation_steps=gas,
        seed=3,
        rank=rank,
        world_size=world,
        collate_fn=_collate,
        lengths=lengths,
    )
    if state is not None:
        gb.load_state_dict(state)
    out = [gb.next() for _ in range(steps)]
    return gb, [[(m["idx"].tolist(), m["n"].tolist()) for m in g] for g in out]


def _spread(batches):
    return float(np.mean([np.std(n) for g in batches for _, n in g]))


def test_group_by_length_batches():
    ds, lengths = _len_ds(960)
    per_epoch = 960 // (4 * 2)  # global batches of 2 micro-batches of 4
    _, plain = _batches(ds, None, per_epoch)
    gb, grouped = _batches(ds, lengths, per_epoch + 3)
    epoch0 = [i for g in grouped[:per_epoch] for idx, _ in g for i in idx]
    assert (
        sorted(epoch0) == sorted(i for g in plain for idx, _ in g for i in idx) == list(range(960))
    )
    assert gb.epoch == 1 and grouped[per_epoch] != grouped[0]  # a new order each epoch
    assert _spread(grouped[:per_epoch]) < 0.2 * _spread(plain)  # similar lengths per micro-batch
    # not a length curriculum: batch lengths are spread over the epoch
    means = [np.mean(n) for g in grouped[:per_epoch] for _, n in g]
    assert abs(np.corrcoef(np.arange(len(means)), means)[0, 1]) < 0.3
    assert _batches(ds, lengths, per_epoch + 3)[1] == grouped  # deterministic
    # resume mid-epoch (and in the next epoch) gives the same following batches
    for k in (7, per_epoch + 1):
        g, _ = _batches(ds, lengths, k)
        state = g.state_dict()
        assert _batches(ds, lengths, 2, state=state)[1] == grouped[k : k + 2]
    # None is the DistributedSampler order, unchanged
    loader = D.make_loader(
        ds, 4, shuffle=True, seed=3, drop_last=True, collate_fn=_collate, rank=0, world_size=1
    )
    assert [m["idx"].tolist() for m in loader][:4] == [idx for g in plain[:2] for idx, _ in g]


def test_group_by_length_two_ranks():
    ds, lengths = _len_ds(203, seed=1)  # not divisible: the 3 left over are left out at random
    r0 = _batches(ds, lengths, 10, rank=0, world=2, gas=1)[1]
    r1 = _batches(ds, lengths, 10, rank=1, world=2, gas=1)[1]
    g0 = D.GlobalBatches(
        ds,
        micro_batch_size=4,
        gradient_accumulation_steps=1,
        seed=3,
        rank=0,
        world_size=2,
        collate_fn=_collate,
        lengths=lengths,
    )
    assert len(g0.loader) == 203 // 8 == 25
    seen0 = {i for g in r0 for idx, _ in g for i in idx}
    seen1 = {i for g in r1 for idx, _ in g for i in idx}
    assert not seen0 & seen1 and len(seen0) == len(seen1) == 40
    # the two ranks' micro-batches of one step have similar lengths
    for (a,), (b,) in zip(r0, r1):
        assert abs(np.mean(a[1]) - np.mean(b[1])) < 15
    with pytest.raises(DataError, match="group_by_length: 5 lengths.*203 rows"):
        D.GlobalBatches(
            ds,
            micro_batch_size=4,
            gradient_accumulation_steps=1,
            seed=0,
            rank=0,
            world_size=1,
            collate_fn=_collate,
            lengths=[1] * 5,
        )
