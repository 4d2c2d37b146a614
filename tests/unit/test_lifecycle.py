"""The run's life on a cluster, in process: the checks that run before the ranks rendezvous
(port, data files), the run-folder lock within one process, verified checkpoints.

The processes (launch/train.py, a second lock holder): ``tests/integration/test_lifecycle.py``."""

import socket

import pytest

from lgtm_ds import ConfigError, DataError
from lgtm_ds.config import load_config


def test_a_taken_master_port_is_one_error_naming_the_flag(monkeypatch):
    import torch.distributed

    from lgtm_ds.engines.dist import check_master_port

    # as in a fresh rank: an earlier test in this process may have started a group (which
    # holds its own port, so the check stands aside then)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        monkeypatch.setenv("MASTER_PORT", str(s.getsockname()[1]))
        with pytest.raises(ConfigError, match=r"MASTER_PORT \d+ is already in use.*--master_port"):
            check_master_port()
    check_master_port()  # the listener is gone: the port is free again


def test_missing_data_files_fail_without_reading_anything(tmp_path):
    from lgtm_ds.data.sources import check_files

    train = tmp_path / "train.csv"
    train.write_text("text,label\na,0\n")
    ok = load_config(None, ["data.source=files", f"data.train_file={train}"])
    check_files(ok.data)
    for key, value, match in (
        ("validation_file", tmp_path / "dev.csv", "data.validation_file: file not found"),
        ("test_file", tmp_path / "test.jsonl", "data.test_file: file not found"),
        ("test_file", tmp_path / "test.xlsx", "data.test_file=.*unsupported extension"),
    ):
        cfg = load_config(None, ["data.source=files", f"data.train_file={train}",
                                 f"data.{key}={value}"])  # fmt: skip
        with pytest.raises(DataError, match=match):
            check_files(cfg.data)


def test_the_lock_is_handed_over_within_one_process(tmp_path):
    """A notebook (or a test) whose first Trainer crashed builds a second one on the folder:
    this process holds the lock already, so the second takes it over silently."""
    from lgtm_ds.training.runlock import FILE, RunLock

    first = RunLock(tmp_path).acquire()
    RunLock.check(tmp_path)  # held by this process: not "another run"
    second = RunLock(tmp_path).acquire()
    assert second.taken_over is None and first.fd is None
    first.release()  # no-op: handed over
    assert (tmp_path / FILE).read_text()
    second.release()
    assert (tmp_path / FILE).read_text() == ""


def _fake_checkpoint(root, tag, seed):
    """The three parts of a checkpoint as save_checkpoint leaves them, with a manifest."""
    import random

    from lgtm_ds.training.checkpoint import write_manifest

    rng = random.Random(seed)
    for role in ("teacher", "student"):
        folder = root / role / tag
        folder.mkdir(parents=True)
        (folder / "mp_rank_00_model_states.pt").write_bytes(rng.randbytes(3001))
        (folder / "optim_states.pt").write_bytes(rng.randbytes(1537))
    (root / tag).mkdir()
    (root / tag / "trainer_state.json").write_text('{"step": 1}')
    (root / tag / "rng_rank0.pt").write_bytes(rng.randbytes(17))
    write_manifest(root, tag, tag)
    (root / "latest").write_text(tag)


def test_manifest_catches_missing_truncated_and_changed_files(tmp_path):
    from lgtm_ds.training.checkpoint import verify_checkpoint

    _fake_checkpoint(tmp_path, "step2", seed=1)
    assert verify_checkpoint(tmp_path, "step2") == []
    model = tmp_path / "teacher" / "step2" / "mp_rank_00_model_states.pt"
    data = model.read_bytes()
    model.write_bytes(data[:1000])  # truncated
    assert verify_checkpoint(tmp_path, "step2") == [
        "changed teacher/step2/mp_rank_00_model_states.pt (1000 bytes, 3001 saved)"
    ]
    model.write_bytes(data[:1500] + bytes([data[1500] ^ 1]) + data[1501:])  # one bit, same size
    assert "CRC-32 differs" in verify_checkpoint(tmp_path, "step2")[0]
    model.write_bytes(data)
    (tmp_path / "student" / "step2" / "optim_states.pt").unlink()
    assert verify_checkpoint(tmp_path, "step2") == ["missing student/step2/optim_states.pt"]
    (tmp_path / "step2" / "manifest.json").unlink()  # a checkpoint from before manifests
    assert verify_checkpoint(tmp_path, "step2") == []
    (tmp_path / "step2" / "trainer_state.json").unlink()
    assert verify_checkpoint(tmp_path, "step2") == ["missing step2/trainer_state.json"]


def test_resume_auto_walks_back_past_damaged_checkpoints(tmp_path, capsys):
    from lgtm_ds.training.checkpoint import resolve_resume

    root = tmp_path / "checkpoints"
    for i, tag in enumerate(("stage1_step4", "step2", "step4", "step6")):
        _fake_checkpoint(root, tag, seed=i)
    (root / "teacher" / "step6" / "optim_states.pt").unlink()
    with open(root / "student" / "step4" / "mp_rank_00_model_states.pt", "r+b") as fh:
        fh.truncate(10)
    assert resolve_resume("auto", tmp_path) == (root, "step2")
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "warning: output.resume=auto: skipped damaged checkpoint step6 (missing "
        "teacher/step6/optim_states.pt)",
        "warning: output.resume=auto: skipped damaged checkpoint step4 (changed "
        "student/step4/mp_rank_00_model_states.pt (10 bytes, 3001 saved))",
        f"warning: output.resume=auto: resuming from {root / 'step2'}",
    ]
    assert resolve_resume("auto", tmp_path, announce=False) == (root, "step2")
    assert capsys.readouterr().out == ""  # the other ranks say nothing
    with pytest.raises(ConfigError, match=r"step6 is damaged: missing teacher/step6/optim_st"):
        resolve_resume(str(root / "step6"), tmp_path)
    for tag in ("step2", "stage1_step4"):
        (root / tag / "rng_rank0.pt").unlink()
    none = r"no checkpoint under .* complete: step6 .*stage1_step4 \(missing stage1_step4/rng_"
    with pytest.raises(ConfigError, match=none + r".*overwrite"):
        resolve_resume("auto", tmp_path)


def test_an_interrupted_run_is_unfinished_not_finished(tmp_path):
    import json

    from lgtm_ds.training.checkpoint import check_run_folder, resume_target

    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    plain = load_config(None, [f"output.dir={tmp_path}"]).output
    with pytest.raises(ConfigError, match="unfinished run.*output.resume=auto"):
        check_run_folder(tmp_path, plain)
    auto = load_config(None, [f"output.dir={tmp_path}", "output.resume=auto"]).output
    check_run_folder(tmp_path, auto)
    assert resume_target(tmp_path, auto) is None  # no checkpoint yet: a fresh start, no error
    (tmp_path / "summary.json").write_text(json.dumps({"status": "completed"}))
    with pytest.raises(ConfigError, match="finished run without checkpoints"):
        resume_target(tmp_path, auto)


def test_a_stale_extension_build_lock_is_removed_a_live_one_kept(tmp_path, monkeypatch):
    """A lock older than the build takes, with nobody in its folder: removed (else every start
    hangs on it); a fresh lock, or one whose folder a process works in: kept."""
    import os
    import time

    from lgtm_ds.engines.dist import STALE_BUILD_LOCK_S, clear_stale_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    old = time.time() - STALE_BUILD_LOCK_S - 60
    locks = {}
    for name in ("stale_op", "fresh_op", "busy_op"):
        (tmp_path / name).mkdir()
        locks[name] = tmp_path / name / "lock"
        locks[name].write_text("")
    for name in ("stale_op", "busy_op"):
        os.utime(locks[name], (old, old))
    monkeypatch.chdir(tmp_path / "busy_op")  # a build (the compiler) runs there
    removed = clear_stale_build_locks()
    assert len(removed) == 1 and str(locks["stale_op"]) in removed[0], removed
    assert not locks["stale_op"].exists()
    assert locks["fresh_op"].exists() and locks["busy_op"].exists()
