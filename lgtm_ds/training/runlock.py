"""One writer per run folder: an exclusive ``fcntl.flock`` on ``<output.dir>/run.lock``.

The lock file holds the holder's host, pid and start time (JSON). Global rank 0 takes it before
it writes anything into the folder and keeps it until the run ends; the kernel releases a
``flock`` when its process dies, however it dies (kill -9 included), so a lock is never left
held by a dead process. A clean end empties the file: a file that still names a holder when
the lock is free is a stale lock of a run that died, taken over with a warning.

A second run on the same folder (a rerun while an orphaned rank still writes, two jobs given
one ``output.dir``) fails in seconds with one error naming the holder. Filesystems without
``flock`` (some network mounts) fall back to the pid in the file: a live pid on this host
holds the folder, a dead one is stale; a holder on another host cannot be checked and holds
the folder until its file is deleted.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
from pathlib import Path

from ..errors import ConfigError

FILE = "run.lock"
_HELD: dict[str, RunLock] = {}  # path -> this process's lock (a notebook's next Trainer reuses it)


def holder_text(info: dict) -> str:
    return (
        f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, "
        f"started {info.get('started', '?')}"
    )


def _read(path: Path) -> dict:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _busy(out: Path, info: dict) -> ConfigError:
    return ConfigError(
        f"output.dir {str(out)!r} is in use by another run ({holder_text(info)}; lock file "
        f"{out / FILE}): wait for it to end or stop it, or pick another output.dir"
    )


class RunLock:
    """The lock on one run folder; :meth:`acquire` / :meth:`release` (idempotent)."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out / FILE
        self.fd: int | None = None
        self.taken_over: dict | None = None  # the stale holder this lock replaced

    @staticmethod
    def check(out: Path) -> None:
        """ConfigError if another process holds ``out``'s lock now; creates nothing (the
        early check, before the run's inputs are read)."""
        path = Path(out) / FILE
        if not path.is_file() or str(path.absolute()) in _HELD:
            return
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(Path(out), _read(path)) from None
        except OSError:
            _fallback_check(Path(out), _read(path))
        finally:
            os.close(fd)

    def acquire(self) -> RunLock:
        """Take the lock (creating the folder); ConfigError naming the holder if it is held.
        A lock this process already holds on the folder (an earlier Trainer in a notebook or
        a test) is handed over."""
        key = str(self.path.absolute())
        if key in _HELD:
            held = _HELD.pop(key)
            self.fd, held.fd = held.fd, None
            _HELD[key] = self
            return self
        self.out.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _busy(self.out, _read(self.path)) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                os.close(fd)
                raise
            try:
                _fallback_check(self.out, _read(self.path))
            except ConfigError:
                os.close(fd)
                raise
        stale = _read(self.path)
        if stale.get("pid"):
            self.taken_over = stale
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd
        _HELD[key] = self
        return self

    def release(self) -> None:
        """Empty the file (a clean end) and let go; the file stays (deleting a lock file that
        another process may just have opened would let two holders in)."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        _HELD.pop(str(self.path.absolute()), None)
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # releases the flock


def _fallback_check(out: Path, info: dict) -> None:
    """No flock on this filesystem: judge by the pid in the file."""
    pid, host = info.get("pid"), info.get("host")
    if not pid or pid == os.getpid():
        return
    if host != socket.gethostname() or _alive(int(pid)):
        raise _busy(out, info)
