"""The run's life on a cluster: bad input fails before the ranks rendezvous, one writer per run
folder (the lock), verified checkpoints, signals and a launcher that died.

Processes here (launch/train.py, lock holders); the in-process tests:
``tests/unit/test_lifecycle.py``."""

import contextlib
import json
import os
import re
import signal
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
    seconds (under 15 s, or 10 s after the imports on a loaded machine), printed by rank 0
    only."""
    t0 = time.time()  # what no check can avoid: Python's imports of torch, transformers, ...
    subprocess.run([sys.executable, "-c", "import lgtm_ds.training.trainer"], env=clean_env())
    imports = time.time() - t0
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
        print(f"rank {rank}: missing ds_config -> exit 2 after {elapsed:.1f} s ({imports:.1f} s)")
        # 12.4 s on the idle-ish dev machine; under load the imports alone take longer
        assert elapsed < max(15, imports + 10), (elapsed, imports)
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


def _wait_for(path, proc, timeout=400):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("sig,on_signal", [(signal.SIGINT, False), (signal.SIGTERM, True)])
def test_signal_writes_interrupted_and_one_line(tmp_path, sig, on_signal):
    out = tmp_path / "run"
    cmd = [sys.executable, TRAIN, f"--output.dir={out}", *SMALL, "--train.max_steps=400"]
    cmd += ["--output.checkpoint_every=3", f"--output.checkpoint_on_signal={on_signal}"]
    proc = subprocess.Popen(
        cmd, env=clean_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for(out / "checkpoints" / "latest", proc)
    t0 = time.time()
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    print(f"{sig.name}: exit {proc.returncode} after {time.time() - t0:.1f} s")
    assert proc.returncode == 128 + sig, stderr[-3000:]
    assert "Traceback" not in stderr and "Traceback" not in stdout
    line = stderr.strip().splitlines()[-1]
    m = re.fullmatch(
        rf"interrupted \({sig.name}\) at step (\d+); the same command with "
        r"output.resume=auto continues from step (\d+)",
        line,
    )
    assert m, line
    k, j = int(m[1]), int(m[2])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] == k
    assert summary["interrupted"]["signal"] == sig.name and summary["interrupted"]["step"] == k
    latest = (out / "checkpoints" / "latest").read_text()
    assert latest == f"step{j}"
    if on_signal:  # a checkpoint at the step it stopped at
        assert j == k
    else:
        assert j <= k and j % 3 == 0
    assert not (out / "student").exists()  # no model that looks like a result
    assert (out / "run.lock").read_text() == ""  # released


_LAUNCHER = """
import os, subprocess, sys
env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
rank = subprocess.Popen(sys.argv[1:], env=env)
print(os.getpid(), rank.pid, flush=True)
sys.exit(rank.wait())
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie nobody reaped yet
    except FileNotFoundError:
        return True


@pytest.mark.slow
@pytest.mark.parametrize("killed", ["launcher", "runner"])
def test_a_rank_whose_launcher_died_ends_itself(tmp_path, killed):
    """runner (the `deepspeed` command) -> launcher (deepspeed.launcher.launch) -> rank, as
    the DeepSpeed launcher starts them; kill -9 the launcher (PR_SET_PDEATHSIG) or the runner
    (the watchdog: the launcher itself goes on), and the rank ends within seconds."""
    out = tmp_path / "run"
    rank_cmd = [sys.executable, TRAIN, f"--output.dir={out}", *SMALL, "--train.max_steps=400"]
    rank_cmd += ["--output.checkpoint_every=3"]
    env = dict(clean_env(), MASTER_PORT=str(free_port()))
    runner = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))",
         sys.executable, "-c", _LAUNCHER, *rank_cmd],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    launcher_pid, rank_pid = map(int, runner.stdout.readline().split())
    try:
        _wait_for(out / "checkpoints" / "latest", runner)
        t0 = time.time()
        os.kill(launcher_pid if killed == "launcher" else runner.pid, signal.SIGKILL)
        while not _gone(rank_pid) and time.time() - t0 < 90:
            time.sleep(0.2)
        elapsed = time.time() - t0
        print(f"kill -9 of the {killed}: the rank ended after {elapsed:.1f} s")
        assert _gone(rank_pid), f"the rank outlived its {killed} by {elapsed:.0f} s"
        summary = json.loads((out / "summary.json").read_text())
        assert summary["status"] == "interrupted"
        assert summary["interrupted"]["signal"] == "SIGTERM"
    finally:
        for pid in (rank_pid, launcher_pid, runner.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        runner.wait()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_signal_to_the_deepspeed_command_leaves_no_rank(tmp_path, sig):
    """SIGTERM (a `timeout`, a cluster's stop) or kill -9 to the `deepspeed` command of a
    2-rank run: its per-node launcher and both ranks end within the bound, rank 0 writes an
    interrupted summary."""
    import psutil

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2"]
    cmd += ["--master_port", str(free_port()), TRAIN, f"--output.dir={out}", *SMALL]
    cmd += ["--train.max_steps=400", "--output.checkpoint_every=3"]
    runner = subprocess.Popen(
        cmd, env=clean_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    family = []
    try:
        _wait_for(out / "checkpoints" / "latest", runner, timeout=600)
        family = psutil.Process(runner.pid).children(recursive=True)
        assert len(family) == 3, family  # the per-node launcher and 2 ranks
        t0 = time.time()
        runner.send_signal(sig)
        runner.wait()
        _, alive = psutil.wait_procs(family, timeout=90)
        print(f"{sig.name} to deepspeed: launcher and ranks gone after {time.time() - t0:.1f} s")
        assert not alive, alive
        summary = json.loads((out / "summary.json").read_text())
        assert summary["status"] == "interrupted" and summary["world_size"] == 2
    finally:
        for p in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        runner.kill()
        runner.wait()


def test_plain_progress_lines_without_a_terminal(tmp_path, dist_env, capsys):
    """stdout and stderr are pytest's captures here, not terminals: no bar, a plain line every
    train.log_every steps, teacher stage 1 included."""
    from lgtm_ds.config import load_config
    from lgtm_ds.training import run

    cmd = [f"output.dir={tmp_path / 'o'}", *(o.removeprefix("--") for o in SMALL)]
    cmd += ["train.max_steps=6", "train.log_every=2", "method.name=vanilla_kd"]
    # stage 1: 0.2 epoch, capped at 6
    run(load_config(None, [*cmd, "method.teacher_stage1_epochs=0.2"]))
    out, err = capsys.readouterr()
    assert "vanilla_kd:" not in err + out  # the bar (transformers' own "Writing model
    # shards" bars stay: the command line turns them off, an in-process run leaves them)
    rows = [line for line in out.splitlines() if " steps/s | ETA " in line]
    pattern = re.compile(
        r"(teacher stage-1 step \d/6 \| teacher_ce|step \d/6 \| student_loss) [\d.e+-]+ \| "
        r"\d[\d.e+]* steps/s \| ETA (\d+h)?(\d+m)?\d+s"
    )
    assert all(pattern.fullmatch(r) for r in rows), rows
    assert [r.split(" |")[0] for r in rows] == [
        *(f"teacher stage-1 step {k}/6" for k in (2, 4, 6)),
        *(f"step {k}/6" for k in (2, 4, 6)),
    ]
    assert rows[-1].endswith("ETA 0s")
