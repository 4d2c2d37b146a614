"""Bad rows of data files named by their line in the file (as an editor shows it), and a CSV
label column of numbers with a stray word refused (every CSV cell is text)."""

import pytest

from lgtm_ds import data as D
from lgtm_ds.config import DataConfig
from lgtm_ds.errors import DataError


def _csv(path, labels, extra_header=""):
    lines = ["review,label"]
    for i, label in enumerate(labels):
        text = f'"a review, with a comma\nand a line break {i}"' if i == 3 else f"review {i}"
        lines.append(f"{text},{label}")
        if i == 5:
            lines.append("")  # a blank line: the reader skips it
    path.write_text(extra_header + "\n".join(lines) + "\n")
    return path


def _load(path, **kw):
    cfg = DataConfig(source="files", train_file=str(path), text_columns=["review"], **kw)
    return D.load_task(cfg, D.build_tokenizer("embedded", D.synthetic_corpus_texts(400, 0)), 0)


def test_csv_numbers_with_a_stray_word_is_one_error_naming_the_lines(tmp_path):
    labels = [i % 2 for i in range(40)]
    labels[9] = labels[31] = "neutral"
    path = _csv(tmp_path / "train.csv", labels)
    # rows 9 and 31: +1 header, +1 the quoted line break in row 3, +1 the blank line after row 5
    with pytest.raises(
        DataError,
        match=r"mixes text labels \['neutral'\] with numeric labels \['0', '1'\].*odd ones out: "
        rf"\['neutral'\] at {tmp_path / 'train.csv'} lines 13, 35\. Use one kind",
    ):
        _load(path)
    _load(_csv(tmp_path / "ok.csv", [i % 2 for i in range(40)]))  # numbers only: fine


def test_missing_label_names_the_csv_line(tmp_path):
    labels = ["pos", "neg"] * 20
    labels[30] = ""
    with pytest.raises(DataError, match=r"column 'label' of .*train.csv: missing label at line 34"):
        _load(_csv(tmp_path / "train.csv", labels))


def test_malformed_jsonl_names_the_line(tmp_path):
    rows = [f'{{"review": "good {i}", "label": "pos"}}' for i in range(9)]
    rows[6] = '{"review": "bad", "label": pos}'
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl as json: line 7, column 28: Expecting value"):
        _load(path)
    doc = tmp_path / "doc.json"  # one JSON document over several lines
    doc.write_text('[\n {"review": "a", "label": "pos"},\n {"review": "b" "label": "neg"}\n]\n')
    with pytest.raises(DataError, match=r"doc.json as json: line 3, column 17: Expecting ','"):
        _load(doc)
