"""One run per workdir: an exclusive ``fcntl.flock`` on ``<workdir>/run.lock`` held for the whole run.

A second run started on the same workdir stops at once with one line naming the holder (PID, host, start
time) instead of interleaving its metrics and checkpoints with the first. The operating system drops the
lock when the holder exits for any reason (even SIGKILL), so a stale file never blocks a later run; the
file's text only says who holds it. With several processes, process 0 takes the lock for the run.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from typing import Any

LOCK_FILE = "run.lock"


class WorkdirLocked(RuntimeError):
    """Another run holds the workdir; the message (one line) names its PID and host."""


class WorkdirLock:
    """Exclusive lock on a workdir (a context manager; ``acquire``/``release`` also work).

    Args:
      workdir: the run directory (created if missing); the lock file is ``<workdir>/run.lock``.

    Raises (from ``acquire``/``__enter__``):
      WorkdirLocked: another process holds the lock.
    """

    def __init__(self, workdir: str | os.PathLike) -> None:
        self.workdir = os.path.abspath(os.fspath(workdir))
        self.path = os.path.join(self.workdir, LOCK_FILE)
        self._file: Any = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> None:
        if self._file is not None:
            return
        os.makedirs(self.workdir, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - kept open while the lock is held
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError (EWOULDBLOCK) when another open file holds it
            handle.seek(0)
            holder = handle.read()
            handle.close()
            raise WorkdirLocked(
                f"workdir {self.workdir} is in use by another run ({describe_holder(holder)}); wait for it to "
                f"finish, stop it, or choose another --workdir"
            ) from None
        handle.seek(0)
        handle.truncate()
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        handle.write(json.dumps(holder) + "\n")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        """Drops the lock (the file stays; its text is rewritten by the next holder)."""
        if self._file is None:
            return
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
        finally:
            self._file.close()
            self._file = None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def describe_holder(text: str) -> str:
    """'pid 1234 on host node-3, started 2026-01-01 10:00:00 UTC' from the lock file's text."""
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on host {holder['host']}, started {holder['started']}"
    except (ValueError, TypeError, KeyError):
        return "its PID and host are not recorded yet"


def lock_workdir(workdir: str | os.PathLike, *, process_index: int, process_count: int) -> WorkdirLock | None:
    """Process 0 takes the workdir's lock; every process raises ``WorkdirLocked`` if it could not.

    With several processes this is a collective (the outcome is shared), so all processes stop together.

    Returns:
      The held lock on process 0 (release it when the run ends), None on the other processes.
    """
    lock, message = None, ""
    if process_index == 0:
        lock = WorkdirLock(workdir)
        try:
            lock.acquire()
        except WorkdirLocked as error:
            lock, message = None, str(error)
    if process_count > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        failed = multihost_utils.process_allgather(np.array([bool(message)], np.bool_))
        if bool(np.any(failed)) and not message:
            message = f"process 0 could not lock workdir {os.path.abspath(os.fspath(workdir))}: another run uses it"
    if message:
        raise WorkdirLocked(message)
    return lock
