"""The run's life on a cluster: bad input fails before the ranks rendezvous, one writer per run
folder (the lock), verified checkpoints.

Processes here (launch/train.py, lock holders); the in-process tests:
``tests/unit/test_lifecycle.py``."""

import json
import os
import subprocess
import sys
import time

import pytest

from lgtm_ds import ConfigError

from ..helpers import ROOT, clean_env, free_port

SMALL = [
    "--data.synthetic_examples=400",
    "--train.micro_batch_size=8",
    "--train.eval_batch_size=64",
    "--train.eval_every=0",
]
TRAIN = os.path.join(ROOT, "launch", "train.py")


def _rank_env(rank: int, world: int, port: int) -> dict:
    env = clean_env()
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    return env


def test_missing_ds_config_fails_before_the_ranks_rendezvous(tmp_path):
    """Rank 0 of a 2-rank group whose rank 1 never comes: a check after the rendezvous would
    wait for rank 1 (and build DeepSpeed's CPU op first); before it, the error comes in
    seconds, printed by rank 0 only."""
    port = free_port()
    args = [sys.executable, TRAIN, "--ds_config", str(tmp_path / "nope.json")]
    args += [f"--output.dir={tmp_path / 'out'}"]
    for rank in (0, 1):
        t0 = time.time()
        proc = subprocess.run(
            args, env=_rank_env(rank, 2, port), capture_output=True, text=True, timeout=120
        )
        elapsed = time.time() - t0
        assert proc.returncode == 2, proc.stderr[-2000:]
        if rank == 0:
            assert proc.stderr.count("error:") == 1 and "nope.json" in proc.stderr
            assert "Traceback" not in proc.stderr
        else:  # the same error on the other ranks: not printed again
            assert "error" not in proc.stderr.lower(), proc.stderr
        print(f"rank {rank}: missing ds_config -> exit 2 after {elapsed:.1f} s")
        assert elapsed < 15, elapsed
    assert not (tmp_path / "out").exists()


_HOLDER = """
import fcntl, json, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"host": os.uname().nodename, "pid": os.getpid(),
                         "started": "2026-01-01T00:00:00+00:00"}).encode())
print("held", flush=True)
time.sleep(120)
"""


def _hold(lock_file):
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(lock_file)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_held_by_another_process_names_it(tmp_path):
    from lgtm_ds.training.runlock import FILE, RunLock

    out = tmp_path / "run"
    holder = _hold(out / FILE)
    try:
        for attempt in (lambda: RunLock.check(out), lambda: RunLock(out).acquire()):
            with pytest.raises(ConfigError, match=f"in use by another run .*pid {holder.pid}"):
                attempt()
    finally:
        holder.kill()
        holder.wait()
    # the holder died (kill -9): the kernel let go; its file still names it -> stale, taken over
    lock = RunLock(out).acquire()
    try:
        assert lock.taken_over["pid"] == holder.pid
        assert json.loads((out / FILE).read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert (out / FILE).read_text() == ""  # a clean end: nobody named, nothing stale
    again = RunLock(out).acquire()
    assert again.taken_over is None
    again.release()


@pytest.mark.slow
def test_two_runs_on_one_folder(tmp_path):
    """The second run of the same command fails in seconds naming the first (which goes on and
    finishes); without the lock it resumed from the first one's checkpoint while the first
    still wrote."""
    out = tmp_path / "run"
    cmd = [sys.executable, TRAIN, f"--output.dir={out}", *SMALL]
    cmd += ["--train.max_steps=400", "--output.checkpoint_every=1", "--output.resume=auto"]
    first = subprocess.Popen(
        cmd, env=clean_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.time() + 400
        while not (out / "checkpoints" / "latest").exists():
            assert first.poll() is None and time.time() < deadline, first.stderr.read()[-2000:]
            time.sleep(0.2)
        t0 = time.time()
        second = subprocess.run(
            cmd, env=clean_env(), cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        elapsed = time.time() - t0
        print(f"second run on a busy folder: exit {second.returncode} after {elapsed:.1f} s")
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"pid {first.pid}" in second.stderr and "in use by another run" in second.stderr
        assert second.stderr.count("\n") == 1  # one line
        assert elapsed < 60, elapsed  # the imports; before: it resumed and trained on
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_damaged_checkpoint_auto_falls_back_explicit_is_one_error(tmp_path, dist_env, damage):
    from lgtm_ds.config import load_config
    from lgtm_ds.training import Trainer

    out, ck = tmp_path / "job", tmp_path / "job" / "checkpoints"
    cmd = [f"output.dir={out}", *(o.removeprefix("--") for o in SMALL), "train.max_steps=6"]
    cmd += ["output.checkpoint_every=2", "output.resume=auto"]
    first = Trainer(load_config(None, cmd))
    step, calls = first.distiller.step, [0]

    def crash_after_5(*a, **k):  # the job is killed in step 6
        calls[0] += 1
        if calls[0] > 5:
            raise KeyboardInterrupt
        return step(*a, **k)

    first.distiller.step = crash_after_5
    with pytest.raises(KeyboardInterrupt):
        first.train()
    assert (ck / "latest").read_text() == "step4"
    manifest = json.loads((ck / "step4" / "manifest.json").read_text())["files"]
    assert {"step4/trainer_state.json", "step4/rng_rank0.pt"} <= set(manifest)
    assert all(any(k.startswith(f"{r}/step4/") for k in manifest) for r in ("teacher", "student"))
    victim = sorted((ck / "teacher" / "step4").glob("*optim_states.pt"))[0]
    rel = victim.relative_to(ck).as_posix()
    if damage == "truncated":
        with open(victim, "r+b") as fh:
            fh.truncate(victim.stat().st_size // 2)
    else:
        victim.unlink()

    word = {"truncated": "changed", "missing": "missing"}[damage]
    with pytest.raises(ConfigError, match=f"step4 is damaged: {word} {rel}"):
        Trainer(load_config(None, [*cmd, f"output.resume={ck / 'step4'}"]))
    second = Trainer(load_config(None, cmd))  # the same command: back to step 2
    assert second.resume_from == (ck, "step2") and second.step == 2
    summary = second.finish(second.train())
    assert summary["steps"] == 6 and summary["resumed_from"] == [str(ck / "step2")]
