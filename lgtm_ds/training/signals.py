"""Stopping a run from outside: SIGINT / SIGTERM, and a launcher that died.

The command line (:func:`install`) turns the first SIGINT or SIGTERM into :class:`Interrupted`,
raised in the main thread: the trainer writes ``summary.json`` with ``"status":
"interrupted"`` and the command exits with 128 + the signal (130 / 143) after one line saying
how to continue, instead of a traceback per rank. With ``output.checkpoint_on_signal`` the
trainer defers it to the end of the current optimizer step and saves a checkpoint first. A
second signal, or :data:`GRACE_S` seconds without an exit (a rank blocked in a collective whose
peer is gone), ends the process at once with the same code.

A rank started by a launcher (``LOCAL_RANK`` set) also ends when the launcher dies, however it
dies (kill -9 included): ``PR_SET_PDEATHSIG`` asks Linux for a SIGTERM when the parent (the
per-node launcher, ``deepspeed.launcher.launch``) exits, and a watchdog thread sends one when
the parent's own parent (the ``deepspeed`` command) goes, which the per-node launcher itself
does not notice. No orphan keeps training and writing into the run folder.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

GRACE_S = 60.0  # from the first signal to a forced exit
_STATE = {"defer": False, "pending": None}


class Interrupted(BaseException):  # noqa: N818 (like KeyboardInterrupt: not an error)
    """SIGINT / SIGTERM reached this rank. ``message``: the line the command prints (set by
    the trainer, which knows the step and the newest checkpoint)."""

    def __init__(self, signum: int, message: str | None = None):
        super().__init__(signum)
        self.signum = signum
        self.message = message

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def install() -> None:
    """The command line's handlers for SIGINT and SIGTERM (a notebook keeps its own)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _first)


def _first(signum, frame) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _again)
    threading.Thread(target=_force_exit, args=(signum,), daemon=True).start()
    if _STATE["defer"]:  # output.checkpoint_on_signal, inside the loop: at the step's end
        _STATE["pending"] = signum
        return
    raise Interrupted(signum)


def _again(signum, frame) -> None:
    os._exit(128 + signum)


def _force_exit(signum: int) -> None:
    time.sleep(GRACE_S)
    sys.stderr.write(f"interrupted ({signal.Signals(signum).name}): no clean exit within "
                     f"{GRACE_S:.0f} s, stopping now\n")  # fmt: skip
    sys.stderr.flush()
    os._exit(128 + signum)


@contextlib.contextmanager
def deferred(on: bool):
    """Inside: a first signal is recorded (:func:`pending`), not raised (``on``)."""
    _STATE["defer"] = on
    try:
        yield
    finally:
        _STATE["defer"] = False


def pending() -> int | None:
    """The signal recorded while deferred, if any."""
    return _STATE["pending"]


# -- a launcher that died ---------------------------------------------------------------------
def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def watch_launcher(interval_s: float = 1.0) -> bool:
    """Under a launcher (``LOCAL_RANK`` in the environment), on Linux: SIGTERM this process
    when its parent or its parent's parent exits. Returns whether it watches."""
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    grandparent = _parent_of(parent)

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            # the parent is gone (where PDEATHSIG is not available), or it was re-parented:
            # the process that started it (the `deepspeed` command) is gone
            if os.getppid() != parent or _parent_of(parent) != grandparent:
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=watch, name="lgtm-ds-launcher-watch", daemon=True).start()
    if os.getppid() != parent:  # died before the watch began
        os.kill(os.getpid(), signal.SIGTERM)
    return True
