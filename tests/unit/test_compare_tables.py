"""compare.py's tables from run summaries (no runs): test-split and extra metric columns, mean and
sample std over seeds, and "n = 1" where one run gives no spread."""

import json

import pytest


def _fake_run(folder, method, seed, student, teacher, test_student=None, ppl=None):
    folder.mkdir(parents=True)
    final = {"student/accuracy": student, "teacher/accuracy": teacher}
    if ppl is not None:
        final["student/perplexity"] = ppl
    s = {
        "status": "completed",
        "method": method,
        "primary_metric": "accuracy",
        "lower_is_better": False,
        "best_student": student + 0.01,
        "final": final,
        "steps": 10,
        "stage1_steps": 0,
        "wall_s": 5.0,
        "peak_memory": {"kind": "cpu", "mb": 100.0},
        "evaluations": [{"step": 0, "student/accuracy": 0.5}, {"step": 10, **final}],
    }
    if test_student is not None:
        s["test"] = {"student/accuracy": test_student, "teacher/accuracy": teacher - 0.1}
    (folder / "summary.json").write_text(json.dumps(s))


@pytest.mark.parametrize("metrics", [[], ["perplexity"]])
def test_tables_carry_the_test_split_and_extra_metrics_and_say_n_1(tmp_path, metrics):
    from lgtm_ds.tools.compare import _row, aggregate, write_outputs

    runs = [
        ("lgtm", 1, tmp_path / "lgtm" / "seed1"),
        ("lgtm", 2, tmp_path / "lgtm" / "seed2"),
        ("online_kd", 1, tmp_path / "online_kd" / "seed1"),
    ]
    _fake_run(runs[0][2], "lgtm", 1, 0.70, 0.80, test_student=0.60, ppl=9.0)
    _fake_run(runs[1][2], "lgtm", 2, 0.74, 0.84, test_student=0.64, ppl=7.0)
    _fake_run(runs[2][2], "online_kd", 1, 0.72, 0.82, test_student=0.66, ppl=8.0)
    rows = [_row(m, s, d, metrics) for m, s, d in runs]
    table = aggregate(rows, ["lgtm", "online_kd"])
    write_outputs(tmp_path, rows, table, runs)
    lgtm = table[0]
    assert lgtm["test_student/accuracy"] == pytest.approx(0.62)
    assert lgtm["test_student/accuracy_std"] == pytest.approx(0.04 / 2**0.5)
    assert lgtm["test_teacher/accuracy"] == pytest.approx(0.72)
    md = (tmp_path / "table.md").read_text()
    assert "| test student/accuracy |" in md and "| test teacher/accuracy |" in md
    assert "0.6200 ± 0.0283" in md
    assert "0.6600 (n = 1)" in md and "± 0.0000" not in md  # one seed: no spread shown
    if metrics:
        assert lgtm["final_student/perplexity"] == pytest.approx(8.0)
        assert "| final student/perplexity |" in md
    else:
        assert "perplexity" not in md


def test_student_only_rows_leave_the_teacher_columns_empty(tmp_path):
    """student_only never trains the teacher: its teacher columns stay empty instead of showing
    the untouched starting model; vanilla KD's teacher (stage 1) is shown."""
    from lgtm_ds.tools.compare import _row

    _fake_run(tmp_path / "a", "student_only", 1, 0.7, 0.55, test_student=0.72)
    _fake_run(tmp_path / "b", "vanilla_kd", 1, 0.7, 0.8, test_student=0.72)
    alone = _row("student_only", 1, tmp_path / "a")
    vanilla = _row("vanilla_kd", 1, tmp_path / "b")
    assert alone["final_teacher"] is None and alone["test_teacher/accuracy"] is None
    assert alone.keys() == vanilla.keys()  # one CSV header serves every row
    assert alone["final_student"] == 0.7 and alone["test_student/accuracy"] == 0.72
    assert vanilla["final_teacher"] == 0.8 and vanilla["test_teacher/accuracy"] == 0.8 - 0.1
