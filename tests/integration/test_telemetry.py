"""Influence telemetry: influence_ratio vs a direct computation, the probe leaves training
untouched, the adaptive influence scale, per-example stats, influence.jsonl through the
trainer (rows = what Distiller.step returned), W&B histograms, the plots.

The runs (trainer, ranks, processes); the in-process tests:
``tests/unit/test_telemetry.py``."""

import json

import pytest
import torch

from lgtm_ds.config import load_config

SMALL = [
    "data.synthetic_examples=400",
    "train.micro_batch_size=8",
    "train.eval_batch_size=64",
    "train.eval_every=0",
    "model.dropout=0.1",
]


def _trainer(out, *overrides):
    from lgtm_ds.training import Trainer

    return Trainer(load_config(None, [f"output.dir={out}", *SMALL, *overrides]))


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_influence_file_rows_are_what_the_steps_returned(tmp_path, dist_env):
    tr = _trainer(
        tmp_path / "run",
        "train.max_steps=4",
        "train.gradient_accumulation_steps=2",
        "train.log_every=2",
    )
    seen = []
    orig = tr.distiller.step

    def step(batch, quiz, **kw):
        m = orig(batch, quiz, **kw)
        index = torch.cat([mb["source_index"] for mb in batch]).tolist()
        seen.append((index, m["influence"].clone(), dict(m["example_stats"])))
        return m

    tr.distiller.step = step
    summary = tr.finish(tr.train())
    rows = _rows(tmp_path / "run" / "influence.jsonl")
    assert len(rows) == 4 * 16 == summary["influence_log"]["rows"]
    for n, (index, infl, stats) in enumerate(seen):
        mine = [r for r in rows if r["step"] == n + 1]
        assert [r["index"] for r in mine] == index
        assert [r["influence"] for r in mine] == infl.double().tolist()
        assert [r["student_p_gold"] for r in mine] == stats["student_p_gold"].double().tolist()
    # the indices are rows of the training data, never quiz rows
    split = json.loads((tmp_path / "run" / "data_split.json").read_text())
    assert not {r["index"] for r in rows} & set(split["quiz_indices"])
    metrics = [r for r in _rows(tmp_path / "run" / "metrics.jsonl") if "influence_mean" in r]
    step1 = [r["influence"] for r in rows if r["step"] == metrics[0]["step"]]
    assert metrics[0]["influence_mean"] == pytest.approx(sum(step1) / len(step1), rel=1e-12)
    # measured every train.log_every steps: the logged ones
    assert [r["step"] for r in metrics] == [2, 4]
    assert all(r["influence_ratio"] > 0 for r in metrics)


def test_tracked_subset_and_row_cap(tmp_path, dist_env):
    tr = _trainer(
        tmp_path / "a",
        "train.max_steps=6",
        "output.influence_log_examples=50",
        "method.influence_ratio_every=0",
    )
    tr.finish(tr.train())
    rows = _rows(tmp_path / "a" / "influence.jsonl")
    assert rows and len({r["index"] for r in rows}) <= 50
    assert not any("influence_ratio" in r for r in _rows(tmp_path / "a" / "metrics.jsonl"))
    tr = _trainer(tmp_path / "b", "train.max_steps=3", "output.influence_log_max_rows=20")
    summary = tr.finish(tr.train())
    assert len(_rows(tmp_path / "b" / "influence.jsonl")) == 20
    assert summary["influence_log"] == {"file": "influence.jsonl", "rows": 20, "capped_at": 20}
    tr = _trainer(tmp_path / "c", "train.max_steps=2", "output.influence_log=false")
    tr.finish(tr.train())
    assert not (tmp_path / "c" / "influence.jsonl").exists()


def test_plot_influence_writes_the_plots_and_refuses_bad_input(tmp_path, capsys):
    from lgtm_ds.tools.plot_influence import main

    run = tmp_path / "run"
    run.mkdir()
    rows, metrics = [], [{"step": 0, "eval": True}]
    g = torch.Generator().manual_seed(0)
    for step in range(1, 31):
        for idx in torch.randperm(40, generator=g)[:8].tolist():
            x = float(torch.randn(1, generator=g))
            rows.append(
                {
                    "step": step,
                    "epoch": 0,
                    "index": idx,
                    "influence": x * 1e-5,
                    "teacher_p_gold": 0.5 + 0.01 * step,
                    "student_p_gold": 0.3 + 0.01 * step,
                }
            )
        if step % 10 == 0:
            metrics.append(
                {"step": step, "influence_ratio": 1e-3 * step, "influence_scale": 1.0 + step}
            )
            metrics.append({"step": step, "eval": True})
    rows.append({"step": 31, "index": 3, "influence": None, "nonfinite": ["influence"]})
    (run / "influence.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    assert main([str(run), "--examples", "3,7"]) == 0
    names = ["influence_examples", "influence_trends", "influence_hist", "influence_ratio"]
    for name in names:
        png = run / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert not list((run / "plots").glob("*.tmp*"))
    capsys.readouterr()
    assert main([str(run), "--examples", "3,999"]) == 2
    assert "[999] not in" in capsys.readouterr().err
    assert main([str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (run / "influence.jsonl").write_text('{"step": 1, "influence": 0.5}\n')  # no index
    assert main([str(run)]) == 2
    assert "no rows with a step, an index" in capsys.readouterr().err
    (run / "influence.jsonl").write_text('{"step": 1\n')
    assert main([str(run)]) == 2
    assert "line 1 is not JSON" in capsys.readouterr().err
