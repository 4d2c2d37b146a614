import json

import datasets
import numpy as np
import pandas as pd
import pytest
import torch

from lgtm_ds import data as D
from lgtm_ds.config import DataConfig
from lgtm_ds.errors import DataError
from lgtm_ds.tasks import get_task

_cfg = DataConfig  # a validated data section


@pytest.fixture(scope="module")
def tok():
    return D.build_tokenizer("embedded", D.synthetic_corpus_texts(400, 0))


# ------------------------------------------------------------------------------ synthetic corpus


def test_synthetic_deterministic_and_seeded():
    a = D.make_synthetic_corpus(300, 7, 0.1)
    b = D.make_synthetic_corpus(300, 7, 0.1)
    c = D.make_synthetic_corpus(300, 8, 0.1)
    assert a == b
    assert a["text"] != c["text"]
    assert set(a) == {"text", "label"}
    assert set(a["label"]) == {0, 1, 2}
    for t in a["text"]:
        n = sum(1 for w in t.split() if w not in {",", ".", ";"})
        assert 8 <= n <= 30, t


def test_synthetic_golden_hash():
    # Pinned so a change of the generator (or of Python's seeded RNG) across machines shows up.
    import hashlib

    blob = json.dumps(D.make_synthetic_corpus(50, 0, 0.1)).encode()
    assert hashlib.sha256(blob).hexdigest()[:16] == "d062468a56d5d4dd"


def test_synthetic_label_noise_fraction_and_clean_rule():
    clean = D.make_synthetic_corpus(1000, 3, 0.0)
    noisy = D.make_synthetic_corpus(1000, 3, 0.15)
    assert clean["text"] == noisy["text"]
    flipped = sum(a != b for a, b in zip(clean["label"], noisy["label"], strict=True))
    assert flipped == 150
    # The clean label is a function of the text (ceiling 100%).
    assert all(
        D.synthetic_rule_label(t) == y for t, y in zip(clean["text"], clean["label"], strict=True)
    )
    counts = np.bincount(clean["label"], minlength=3)
    assert counts.min() > 280


def _bow_accuracy(train, val):
    vocab = sorted({w for t in train["text"] for w in t.split()})
    idx = {w: i for i, w in enumerate(vocab)}

    def feats(texts):
        m = torch.zeros(len(texts), len(vocab))
        for i, t in enumerate(texts):
            for w in t.split():
                if w in idx:
                    m[i, idx[w]] += 1
        return m

    xtr, xva = feats(train["text"]), feats(val["text"])
    ytr, yva = torch.tensor(train["label"]), torch.tensor(val["label"])
    w = torch.zeros(len(vocab), 3, requires_grad=True)
    b = torch.zeros(3, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xtr @ w + b, ytr) + 1e-4 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return ((xva @ w + b).argmax(1) == yva).float().mean().item()


@pytest.mark.slow  # the fast lane (tests/unit -m 'not slow') leaves it out
def test_bag_of_words_is_clearly_below_ceiling():
    train = D.make_synthetic_corpus(3000, 42, 0.0)
    val = D.make_synthetic_corpus(600, 42 + 1_000_003, 0.0)
    acc = _bow_accuracy(train, val)
    rule = np.mean(
        [D.synthetic_rule_label(t) == y for t, y in zip(val["text"], val["label"], strict=True)]
    )
    assert rule == 1.0
    assert 0.45 < acc < 0.8, acc  # measured ~0.63: negation / contrast defeat bag of words


# ------------------------------------------------------------------------------ tokenizer


def test_embedded_tokenizer_round_trip(tok, tmp_path):
    from transformers import AutoTokenizer

    assert tok.pad_token_id == 0
    assert tok.convert_tokens_to_ids(["[UNK]", "[CLS]", "[SEP]", "[MASK]"]) == [1, 2, 3, 4]
    enc = tok("The Film was NOT good.", "the plot was dull")
    assert enc["input_ids"][0] == tok.cls_token_id
    assert enc["input_ids"].count(tok.sep_token_id) == 2
    assert set(enc["token_type_ids"]) == {0, 1}
    assert tok.unk_token_id not in enc["input_ids"]
    tok.save_pretrained(tmp_path / "tok")
    again = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert (
        again("the film was not good .")["input_ids"] == tok("the film was not good .")["input_ids"]
    )
    assert again.pad_token_id == 0 and len(again) == len(tok)
    # deterministic build
    tok2 = D.build_tokenizer("embedded", D.synthetic_corpus_texts(400, 0))
    assert tok2.get_vocab() == tok.get_vocab()


def test_build_tokenizer_bad_name():
    with pytest.raises(DataError, match="/no/such/tokenizer_dir"):
        D.build_tokenizer("/no/such/tokenizer_dir")


# ------------------------------------------------------------------------------ synthetic task


def test_load_synthetic_quiz_split(tok):
    cfg = _cfg(synthetic_examples=400, quiz_fraction=0.1, max_length=64)
    task = D.load_task(cfg, tok, seed=5)
    assert task.name == "synthetic" and task.num_labels == 3
    assert task.task.name == "classification" and task.task.metric_names == ["accuracy"]
    assert task.task.label_names == ["negative", "neutral", "positive"]
    assert len(task.quiz) == 40 and len(task.train) == 360 and len(task.eval) == 200
    assert len(task.quiz_indices) == 40 and len(set(task.quiz_indices)) == 40
    assert set(task.train.column_names) == {
        "source_index",  # the row in the source's training data (influence telemetry)
        "input_ids",
        "attention_mask",
        "token_type_ids",
        "labels",
    }
    assert "source_index" not in task.quiz.column_names + task.eval.column_names
    # quiz rows are exactly the recorded rows of the original training set, disjoint from train
    corpus = D.make_synthetic_corpus(400, 5, cfg.synthetic_label_noise)
    enc = lambda i: tok(corpus["text"][i], truncation=True, max_length=64)["input_ids"]  # noqa: E731
    assert task.quiz["input_ids"] == [enc(i) for i in task.quiz_indices]
    rest = [i for i in range(400) if i not in set(task.quiz_indices)]
    assert task.train["input_ids"] == [enc(i) for i in rest]
    assert task.train["source_index"] == rest
    assert task.quiz["labels"] == [corpus["label"][i] for i in task.quiz_indices]
    # same seed -> same split; different seed -> different
    assert D.load_task(cfg, tok, seed=5).quiz_indices == task.quiz_indices
    assert D.load_task(cfg, tok, seed=6).quiz_indices != task.quiz_indices
    # validation is noise-free
    assert all(
        D.synthetic_rule_label(t) == y
        for t, y in zip(*D.make_synthetic_corpus(200, 5 + 1_000_003, 0.0).values(), strict=True)
    )


def test_quiz_source_validation(tok):
    cfg = _cfg(
        synthetic_examples=300,
        quiz_source="validation",
        max_train_examples=100,
        max_eval_examples=50,
    )
    task = D.load_task(cfg, tok, seed=0)
    assert task.quiz_indices == [] and task.quiz_source == "validation"
    assert len(task.train) == 100 and len(task.eval) == 50
    assert task.quiz["input_ids"] == task.eval["input_ids"]


# ------------------------------------------------------------------------------ GLUE


def _fake_glue(task):
    cols = D.GLUE_TASKS[task].text_columns
    val_split = D.GLUE_TASKS[task].eval_split
    reg = task == "stsb"
    label_feat = datasets.Value("float32") if reg else datasets.ClassLabel(names=["no", "yes"])

    def split(n, off):
        d = {c: [f"{c} number {i + off} is fine" for i in range(n)] for c in cols}
        d["label"] = [float(i % 5) if reg else i % 2 for i in range(n)]
        feats = datasets.Features(
            {**{c: datasets.Value("string") for c in cols}, "label": label_feat}
        )
        return datasets.Dataset.from_dict(d, features=feats)

    return datasets.DatasetDict({"train": split(40, 0), val_split: split(10, 100)})


@pytest.mark.parametrize("task", ["mrpc", "stsb", "cola"])
def test_glue_path_with_fake_hub(tok, task):
    calls = []

    def fake_load(path, name=None, **kw):
        calls.append((path, name))
        return _fake_glue(name)

    cfg = _cfg(source="glue", task=task.upper(), quiz_fraction=0.25)
    t = D.load_task(cfg, tok, seed=1, _load_dataset=fake_load)
    assert calls == [("nyu-mll/glue", task)]
    assert t.name == task and len(t.train) == 30 and len(t.quiz) == 10 and len(t.eval) == 10
    if task == "stsb":
        assert t.task.name == "regression" and t.num_labels == 1
        assert t.task.metric_names == ["pearson", "spearman"]
        assert isinstance(t.train[0]["labels"], float)
    else:
        assert t.task.label_names == ["no", "yes"] and t.num_labels == 2
    if task == "mrpc":
        assert set(t.train[0]["token_type_ids"]) == {0, 1}
        assert t.task.metric_names == ["f1", "accuracy"]
    if task == "cola":
        assert t.task.metric_names == ["matthews"]


def test_glue_unknown_task_and_hub_failure(tok):
    with pytest.raises(DataError, match="'boolq'.*cola"):
        D.load_task(_cfg(source="glue", task="boolq"), tok, 0)

    def offline(*a, **k):
        raise ConnectionError("no route to host")

    with pytest.raises(DataError, match="'rte'.*unreachable.*no route to host"):
        D.load_task(_cfg(source="glue", task="rte"), tok, 0, _load_dataset=offline)


def test_glue_mnli_uses_validation_matched(tok):
    def fake(path, name=None, **kw):
        d = _fake_glue("mnli")
        return d

    t = D.load_task(_cfg(source="glue", task="mnli"), tok, 0, _load_dataset=fake)
    assert len(t.eval) == 10


# ------------------------------------------------------------------------------ files


def _rows(n, pair=False, label=lambda i: ["pos", "neg", "meh"][i % 3]):
    rows = []
    for i in range(n):
        r = {"review": f"the plot of the film was good number {i}", "label": label(i)}
        if pair:
            r["other"] = f"the acting was bad {i}"
        rows.append(r)
    return rows


def _write(path, rows):
    df = pd.DataFrame(rows)
    ext = path.suffix
    if ext == ".csv":
        df.to_csv(path, index=False)
    elif ext == ".json":
        path.write_text(json.dumps(rows))
    elif ext == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        df.to_parquet(path)
    return str(path)


@pytest.mark.parametrize("ext", [".csv", ".json", ".jsonl", ".parquet"])
def test_files_each_format_string_labels_and_pairs(tok, tmp_path, ext):
    tr = _write(tmp_path / f"mytrain{ext}", _rows(30, pair=True))
    va = _write(
        tmp_path / f"myval{ext}", _rows(9, pair=True, label=lambda i: ["meh", "pos"][i % 2])
    )
    cfg = _cfg(
        source="files",
        train_file=tr,
        validation_file=va,
        text_columns=["review", "other"],
        quiz_fraction=0.2,
    )
    t = D.load_task(cfg, tok, seed=3)
    assert t.name == "mytrain" and t.num_labels == 3
    assert t.task.label_names == ["meh", "neg", "pos"]
    assert len(t.train) == 24 and len(t.quiz) == 6 and len(t.eval) == 9
    assert t.eval["labels"] == [[0, 2][i % 2] for i in range(9)]
    assert set(t.train[0]["token_type_ids"]) == {0, 1}
    assert sorted(t.quiz_indices + [i for i in range(30) if i not in t.quiz_indices]) == list(
        range(30)
    )
    assert list(tmp_path.iterdir()) and not any(
        p.name.startswith("lgtm_ds_cache") for p in tmp_path.iterdir()
    )


def test_files_int_float_labels_and_carved_eval(tok, tmp_path):
    tr = _write(tmp_path / "ints.csv", _rows(50, label=lambda i: i % 2))
    t = D.load_task(_cfg(source="files", train_file=tr, text_columns=["review"]), tok, seed=0)
    assert t.num_labels == 2 and t.task.label_names == ["0", "1"]
    assert t.task.name == "classification"
    assert len(t.eval) == 5 and len(t.eval_indices) == 5 and len(t.quiz) == 4 and len(t.train) == 41
    assert not set(t.eval_indices) & set(t.quiz_indices)
    fl = _write(tmp_path / "floats.jsonl", _rows(20, label=lambda i: i / 4))
    v = _write(tmp_path / "floats_val.jsonl", _rows(5, label=lambda i: i / 3))
    t = D.load_task(
        _cfg(source="files", train_file=fl, validation_file=v, text_columns=["review"]), tok, seed=0
    )
    assert t.task.name == "regression" and t.num_labels == 1
    assert t.task.metric_names == ["pearson", "spearman"]


def test_files_errors(tok, tmp_path):
    tr = _write(tmp_path / "train.csv", _rows(20))
    with pytest.raises(DataError, match="'sentence'.*train.csv.*review"):
        D.load_task(_cfg(source="files", train_file=tr, text_columns=["sentence"]), tok, 0)
    with pytest.raises(DataError, match="'target'.*train.csv"):
        D.load_task(
            _cfg(source="files", train_file=tr, text_columns=["review"], label_column="target"),
            tok,
            0,
        )
    with pytest.raises(DataError, match="nope.csv"):
        D.load_task(
            _cfg(source="files", train_file=str(tmp_path / "nope.csv"), text_columns=["review"]),
            tok,
            0,
        )
    va = _write(tmp_path / "val.csv", _rows(3, label=lambda i: "surprise"))
    with pytest.raises(DataError, match="surprise"):
        D.load_task(
            _cfg(source="files", train_file=tr, validation_file=va, text_columns=["review"]), tok, 0
        )
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="training split.*empty.jsonl.*empty"):
        D.load_task(_cfg(source="files", train_file=str(empty), text_columns=["review"]), tok, 0)
    header_only = tmp_path / "header.csv"
    header_only.write_text("review,label\n")
    with pytest.raises(DataError, match="validation split.*header.csv.*empty"):
        D.load_task(
            _cfg(
                source="files",
                train_file=tr,
                validation_file=str(header_only),
                text_columns=["review"],
            ),
            tok,
            0,
        )


def test_empty_validation_split(tok):
    def fake(path, name=None, **kw):
        d = _fake_glue("rte")
        return datasets.DatasetDict({"train": d["train"], "validation": d["validation"].select([])})

    with pytest.raises(DataError, match="validation split of 'rte' is empty"):
        D.load_task(_cfg(source="glue", task="rte"), tok, 0, _load_dataset=fake)


# ------------------------------------------------------------------------------ loaders


def _toy_ds(n, reg=False):
    return datasets.Dataset.from_dict(
        {
            "input_ids": [[2] + [10 + i] * (1 + i % 5) + [3] for i in range(n)],
            "attention_mask": [[1] * (3 + i % 5) for i in range(n)],
            "token_type_ids": [[0] * (3 + i % 5) for i in range(n)],
            "labels": [float(i) if reg else i % 3 for i in range(n)],
        }
    )


CLS, REG = get_task("classification")(), get_task("regression")()


def test_loader_padding_and_dtypes(tok):
    ds = _toy_ds(10)
    pad = CLS.collator(tok)
    batches = list(D.make_loader(ds, 4, shuffle=False, seed=0, drop_last=False, collate_fn=pad))
    b = batches[0]
    assert b["input_ids"].shape == (4, 6) and b["labels"].dtype == torch.long
    assert b["input_ids"][0].tolist() == [2, 10, 3, 0, 0, 0]
    assert b["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0]
    assert b["token_type_ids"][0].tolist() == [0] * 6
    assert b["attention_mask"].sum().item() == sum(3 + i % 5 for i in range(4))
    assert [len(x["labels"]) for x in batches] == [4, 4, 2]
    pad8 = CLS.collator(tok, pad_to_multiple_of=8)
    b8 = next(iter(D.make_loader(ds, 4, shuffle=False, seed=0, drop_last=False, collate_fn=pad8)))
    assert b8["input_ids"].shape == (4, 8)
    reg = next(
        iter(
            D.make_loader(
                _toy_ds(4, reg=True),
                4,
                shuffle=False,
                seed=0,
                drop_last=False,
                collate_fn=REG.collator(tok),
            )
        )
    )
    assert reg["labels"].dtype == torch.float32


def test_two_ranks_cover_disjointly_and_reshuffle(tok):
    ds = _toy_ds(20)

    def ids(rank, epoch):
        loader = D.make_loader(
            ds,
            3,
            shuffle=True,
            seed=7,
            rank=rank,
            world_size=2,
            drop_last=False,
            collate_fn=CLS.collator(tok),
            epoch=epoch,
        )
        return [int(x) for b in loader for x in b["input_ids"][:, 1]]

    r0, r1 = ids(0, 0), ids(1, 0)
    assert len(r0) == len(r1) == 10
    assert sorted(r0 + r1) == [10 + i for i in range(20)]
    assert ids(0, 0) == r0  # deterministic
    assert ids(0, 1) != r0  # new epoch, new order


def test_infinite_loader_cycles_deterministically(tok):
    ds = _toy_ds(6)
    loader = D.make_loader(
        ds, 4, shuffle=True, seed=1, drop_last=True, collate_fn=CLS.collator(tok)
    )
    inf = D.InfiniteLoader(loader)
    seq = [next(inf)["labels"].tolist() for _ in range(5)]
    assert inf.epoch == 4  # one batch per epoch with drop_last
    assert len({tuple(s) for s in seq}) > 1
    inf2 = D.InfiniteLoader(
        D.make_loader(ds, 4, shuffle=True, seed=1, drop_last=True, collate_fn=CLS.collator(tok))
    )
    assert [next(inf2)["labels"].tolist() for _ in range(5)] == seq
    state = inf.state_dict()
    nxt = next(inf)["labels"].tolist()
    inf3 = D.InfiniteLoader(
        D.make_loader(ds, 4, shuffle=True, seed=1, drop_last=True, collate_fn=CLS.collator(tok))
    )
    inf3.load_state_dict(state)
    assert next(inf3)["labels"].tolist() == nxt


@pytest.mark.parametrize(
    "labels,task_type,want_type,want_names",
    [
        ([0.0, 1.0], None, "classification", ["0", "1"]),  # integral floats are classes
        ([0, 5], None, "classification", ["0", "5"]),  # a gap: 2 classes, not 6
        ([1, 2, 3], None, "classification", ["1", "2", "3"]),  # an offset: no empty class 0
        ([-1, 1], None, "classification", ["-1", "1"]),
        ([0.0, 1.0], "regression", "regression", None),  # the config says regression
        ([0.5, 1.25], None, "regression", None),  # really fractional
        (["pos", "neg"], None, "classification", ["neg", "pos"]),
    ],
)
def test_file_labels_map_to_contiguous_ids(tok, tmp_path, labels, task_type, want_type, want_names):
    rows = _rows(40, label=lambda i: labels[i % len(labels)])
    tr = _write(tmp_path / "train.jsonl", rows)
    cfg = _cfg(source="files", train_file=tr, text_columns=["review"], task_type=task_type)
    t = D.load_task(cfg, tok, seed=0)
    assert t.task.name == want_type and t.task.label_names == want_names
    assert t.split_record()["label_names"] == want_names
    if want_type == "classification":
        ids = sorted(set(t.train["labels"]))
        assert ids == list(range(len(want_names)))
        # the id of a row is the position of its original label among the sorted names
        raw = [r["label"] for r in rows]
        first = t.quiz_indices[0]
        orig = raw[first]
        orig = str(int(orig)) if isinstance(orig, float) else str(orig)
        assert want_names[t.quiz["labels"][0]] == orig


def test_mixed_text_and_numeric_labels_is_one_error(tok, tmp_path):
    rows = _rows(30, label=lambda i: i % 2)
    rows[7]["label"] = "pos"
    tr = _write(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match=r"mixes text labels \['pos'\].*odd ones out: \['pos'\]"):
        D.load_task(_cfg(source="files", train_file=tr, text_columns=["review"]), tok, 0)


def test_fractional_labels_for_classification_is_one_error(tok, tmp_path):
    tr = _write(tmp_path / "train.jsonl", _rows(30, label=lambda i: i / 4))
    cfg = _cfg(source="files", train_file=tr, text_columns=["review"], task_type="classification")
    with pytest.raises(DataError, match="fractional value"):
        D.load_task(cfg, tok, 0)
