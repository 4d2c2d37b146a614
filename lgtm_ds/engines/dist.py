"""The process group: torch.distributed through DeepSpeed (gloo on CPU), its collectives of
Python objects, its shutdown, and DeepSpeed's logger. One of the modules that import DeepSpeed
(``tests/unit/test_architecture.py`` lists them)."""

from __future__ import annotations

import contextlib
import datetime
import errno
import os
import time
import warnings
from pathlib import Path

import torch

from ..errors import ConfigError

# torch 2.13 marks the reduce-scatter DeepSpeed's comm calls as deprecated (one warning per rank)
warnings.filterwarnings(
    "ignore", message=r".*reduce_scatter_tensor. is deprecated", category=FutureWarning
)


def env_rank_world() -> tuple[int, int]:
    """(global rank, world size) from the launcher's environment, before any process group
    exists: ``RANK`` / ``WORLD_SIZE``, (0, 1) for a plain ``python launch/train.py``."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as e:
        raise ConfigError(f"env RANK / WORLD_SIZE: not an integer ({e})") from None


def check_master_port() -> None:
    """Rank 0, before the process group starts: one ConfigError naming ``--master_port`` when
    ``MASTER_PORT`` is taken on this host (e.g. a second run on the node with the launcher's
    default 29500), instead of a 50-line EADDRINUSE traceback from the rendezvous store. A
    plain ``python launch/train.py`` (no launcher) picks a free port itself
    (:func:`init_distributed`), so this only checks a port a launcher or the user chose."""
    import socket

    import torch.distributed as tdist

    port = os.environ.get("MASTER_PORT")
    if not port or not port.isdigit() or (tdist.is_available() and tdist.is_initialized()):
        return  # (a group this process already runs holds the port itself)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # as the rendezvous store binds: SO_REUSEADDR, so only a listening socket is a conflict
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", int(port)))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                return  # not ours to judge (e.g. a privileged port): the store reports it
            raise ConfigError(
                f"MASTER_PORT {port} is already in use on this host (another run on this node?): "
                f"give the launcher a free port, `deepspeed --master_port <port> ...`"
            ) from None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STALE_BUILD_LOCK_S = 600.0  # DeepSpeed's CPU op built in about 100 s on the 2-core dev machine


def clear_stale_build_locks(now: float | None = None) -> list[str]:
    """Remove the PyTorch extension build locks (``<TORCH_EXTENSIONS_DIR>/<op>/lock``) that a
    process killed while JIT-building an op left behind; returns a warning per lock removed.

    PyTorch's build lock holds no owner: every later build of that op (DeepSpeed's CPU
    communication op, at every start on CPU) waits for it to go, at 0% CPU and without a
    word, forever. A lock counts as stale when it is older than :data:`STALE_BUILD_LOCK_S`
    and no process works in its build folder (the compiler runs there)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        root = Path(_get_build_directory("lgtm_ds_probe", False)).parent
    except Exception:  # noqa: BLE001 (a private helper of torch: no check rather than a crash)
        return []
    now = time.time() if now is None else now
    removed = []
    for lock in sorted(root.glob("*/lock")):
        try:
            age = now - lock.stat().st_mtime
        except FileNotFoundError:
            continue
        if age < STALE_BUILD_LOCK_S or _working_in(lock.parent):
            continue
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
            removed.append(
                f"warning: removed the stale extension build lock {lock} ({age / 60:.0f} min "
                f"old, no build running): a process killed while building "
                f"{lock.parent.name} left it, and every start waited on it"
            )
    return removed


def _working_in(folder: Path) -> bool:
    """Some process (of those this user may inspect) has ``folder`` as its working directory."""
    target = str(folder.resolve())
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if os.readlink(proc / "cwd") == target:
                return True
        except OSError:
            continue
    return False


def init_distributed(timeout_s: float = 600.0) -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU). Returns (rank, world)."""
    import deepspeed

    for warning in clear_stale_build_locks():  # else a JIT build below waits forever
        print(warning, flush=True)

    if "RANK" not in os.environ:  # plain `python launch/train.py`: a one-process group
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        # a free port: two plain runs on one machine must not collide on a fixed default
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    # note: the timeout turns a collective hang (e.g. mismatched steps across ranks) into an error
    deepspeed.init_distributed(timeout=datetime.timedelta(seconds=timeout_s), verbose=False)
    import deepspeed.comm as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    _unlink_shm_buffer(rank, world)
    return rank, world


def shm_buffer_path(rank: int) -> str:
    """The file DeepSpeed's CPU shared-memory all-reduce creates for ``rank`` of the group that
    ``MASTER_ADDR``/``MASTER_PORT`` name (its naming, ops/csrc/cpu/comm/shm.cpp)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def _unlink_shm_buffer(rank: int, world: int) -> None:
    """DeepSpeed's CPU backend creates a 66 MB /dev/shm file per rank when all ranks share a
    node (for its inference all-reduce; training never calls it) and never unlinks it (known
    upstream, deepspeedai/DeepSpeed#4115): every launch left 66 MB of RAM per rank behind. On
    the dev machine a day of test runs left 308 files, 20 GB of its 24 GB, and the next CI run
    hung. Each rank maps every peer's file during init, so once all ranks are past init (the
    barrier) each unlinks its own: the mappings stay valid, and the memory is freed when the
    processes exit, however they exit."""
    if world > 1:  # every rank, file or not: a barrier only some ranks enter would hang
        import deepspeed.comm as dist

        dist.barrier()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(shm_buffer_path(rank))


def set_log_level(level: int) -> None:
    """DeepSpeed's logger at ``level`` (a ``logging`` level). At WARNING or above on a machine
    without CUDA, the accelerator is named (``DS_ACCELERATOR=cpu``, unless set) so that DeepSpeed
    does not warn that it guessed it. Call before DeepSpeed is first imported."""
    import logging

    if level >= logging.WARNING and "DS_ACCELERATOR" not in os.environ:
        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
    from deepspeed.utils import logger

    logger.setLevel(level)


def shutdown_distributed() -> None:
    """Barrier, then tear the process group down before the interpreter exits.

    Without it a rank that finishes first can abort at exit ("terminate called without an
    active exception": a communication thread still joinable), and the launcher then reports a
    failed run although every output was written. Seen once in ~10 two-rank CPU runs.
    """
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        try:
            tdist.barrier()
        finally:
            tdist.destroy_process_group()


def barrier() -> None:
    """All ranks wait here (no-op on one process)."""
    import deepspeed.comm as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_gather_object(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (pickled; a collective: every rank calls it)."""
    import deepspeed.comm as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
