"""The test split through the trainer: read once after training, into summary.json, one metrics
row and the summary; the evaluations during training use the dev file only."""

import json

from lgtm_ds.config import load_config
from lgtm_ds.tools import prepare_real as pr

from ..unit.test_prepare_real import _rt_csv, _rt_rows


def test_the_test_split_is_read_once_after_training(tmp_path, dist_env):
    """summary.json's ``test``: both final models on the test file; one metrics row for it;
    the evaluations during training are on the dev file only."""
    from lgtm_ds.training import run

    src = tmp_path / "rt.csv.bz2"
    _rt_csv(src, _rt_rows(movies=40))
    pr.convert_rotten_tomatoes(src, tmp_path, seed=0)
    cfg = load_config(
        None,
        [
            f"output.dir={tmp_path / 'out'}",
            "data.source=files",
            f"data.train_file={tmp_path / 'train.jsonl'}",
            f"data.validation_file={tmp_path / 'dev.jsonl'}",
            f"data.test_file={tmp_path / 'test.jsonl'}",
            "data.text_columns=[text]",
            "data.quiz_fraction=0.2",
            "train.micro_batch_size=8",
            "train.max_steps=3",
            "train.eval_every=3",
        ],
    )
    summary = run(cfg)
    assert set(summary["test"]) == {"student/accuracy", "teacher/accuracy"}
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("split") == "test"] == [3]
    assert "test (final models): student/accuracy" in (tmp_path / "out" / "summary.txt").read_text()
    split = json.loads((tmp_path / "out" / "data_split.json").read_text())
    n_test = len((tmp_path / "test.jsonl").read_text().splitlines())
    assert split["n_test"] == n_test
