"""Checkpoints and resume: one command both starts and continues a job (``resume: auto``),
the resumed run equals the uninterrupted one bit for bit (vanilla KD's stage 1 included) and its
outputs cover the whole run, atomic saves (``*.partial`` + rename, ``latest`` last), retention,
and kill -9 at random moments."""


def test_wandb_run_continues_after_resume_with_increasing_steps(tmp_path, monkeypatch):
    """One W&B run per job: the resumed logger reuses the saved run id; stage-1 rows keep their
    steps and later rows come after them (W&B drops non-increasing steps)."""
    import sys
    import types

    from lgtm_ds.training.logger import MetricsLogger

    calls = []

    class Run:
        def log(self, row, step):
            calls.append(("log", step, row))

        def finish(self):
            pass

    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or Run())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    path = tmp_path / "metrics.jsonl"
    log = MetricsLogger(path, enabled=True, wandb=True)
    log.step_offset = 5
    log.log({"stage": 1, "step": 5, "teacher_ce": 1.0})
    log.log({"step": 1, "student_loss": 2.0})
    log.close()
    assert [c[1] for c in calls if c[0] == "log"] == [5, 6]
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    assert len(run_id) == 8
    MetricsLogger(path, enabled=True, wandb=True, resume=True).close()
    MetricsLogger(path, enabled=True, wandb=True).close()  # a fresh start: a new run
    inits = [c[1] for c in calls if c[0] == "init"]
    assert inits[0]["id"] == inits[1]["id"] == run_id != inits[2]["id"]
    assert inits[1]["resume"] == "allow"
