"""The training program's hold on its workdir: one trainer at a time, and writable storage.

Standard library only, POSIX (a lock can be taken or inspected without importing JAX).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import tempfile
import time
from pathlib import Path

__all__ = ["WorkdirLock", "WorkdirLockedError", "check_writable"]

LOCK_NAME = "train.lock"


class WorkdirLockedError(RuntimeError):
    """Another trainer holds the workdir."""


def check_writable(path: str | os.PathLike, what: str) -> None:
    """Creates the directory ``path`` (and its parents) if needed, and raises
    ``PermissionError`` naming it unless a file can be created, written, synced and
    removed there (``what`` says what it is for). A directory that cannot be created
    (a file on the way, no permission) is an ``OSError`` of its kind naming it too."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # was a bare traceback from mkdir (e.g. a file in the way)
        raise type(e)(
            e.errno,
            f"{path} cannot be created as a directory ({type(e).__name__}: {e.strerror or e}); "
            f"training needs it for {what}. Choose another --workdir; nothing was trained",
        ) from e
    problem = None
    if not os.access(path, os.W_OK | os.X_OK):
        problem = "no write permission"
    else:
        try:
            fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
            try:
                os.write(fd, b"jattn")
                os.fsync(fd)
            finally:
                os.close(fd)
                os.unlink(probe)
        except OSError as e:
            problem = f"{type(e).__name__}: {e.strerror or e}"
    if problem is not None:
        raise PermissionError(
            errno.EACCES,
            f"{path} is not writable ({problem}); training needs it for {what}. Make it "
            "writable (or free space), or choose another --workdir; nothing was trained",
        )


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _describe(holder: dict) -> str:
    since = holder.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else "?"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {when}"


class WorkdirLock:
    """An exclusive lock on ``workdir/train.lock``, holding the holder's pid, host and
    start time (JSON) for the message a second trainer gets.

    The lock is an ``flock`` on the file: the kernel releases it when the holder exits,
    even on SIGKILL, so a crashed trainer never blocks the next one; the next one finds
    the dead holder's record (checked by pid on the same host) and says so in
    :attr:`stale`. On file systems without ``flock`` support it falls back to the
    record alone: a holder whose pid still runs on this host keeps the lock.
    """

    def __init__(self, workdir: str | os.PathLike):
        self.path = Path(workdir) / LOCK_NAME
        self.stale: str | None = None  # the crashed holder whose lock was taken over
        self._fd: int | None = None

    def _read(self, fd: int) -> dict | None:
        try:
            data = json.loads(os.pread(fd, 4096, 0).decode())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def _refuse(self, holder: dict | None, *, unchecked: bool = False):
        who = _describe(holder) if holder else "a process that has not written its pid yet"
        hint = f"; if it is not running any more, delete {self.path}" if unchecked else ""
        raise WorkdirLockedError(
            f"{self.path.parent} is in use by another trainer ({who}; lock {self.path}). "
            f"Wait for it to finish or stop it, or use another --workdir{hint}"
        )

    def acquire(self) -> WorkdirLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            flock = True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._refuse(self._read(fd))
            except OSError as e:  # ENOLCK, EOPNOTSUPP...: no flock on this file system
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                flock = False
            previous = self._read(fd)
            host = socket.gethostname()
            pid = previous.get("pid") if previous else None
            if isinstance(pid, int) and pid != os.getpid():
                alive = previous.get("host") == host and _pid_running(pid)
                if not flock and (alive or previous.get("host") != host):
                    # the record is all there is to go by; another host's pid is unchecked
                    self._refuse(previous, unchecked=not alive)
                # With flock, a record under a free lock is one its holder never cleared:
                # it died (a pid running again is another process that reused it).
                self.stale = _describe(previous) + (", its pid since reused" if alive else "")
            record = json.dumps({"pid": os.getpid(), "host": host, "since": time.time()})
            os.ftruncate(fd, 0)
            os.pwrite(fd, record.encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Empties the record and unlocks (the file stays: removing it would race with
        a trainer that has it open)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass  # unlocking matters more than the record
        finally:
            os.close(fd)  # releases the flock

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
