"""One run per run directory: an OS lock (flock) on RUN_DIR/run.lock, held by global rank 0 for the run's life.

The kernel drops an flock when the process that holds it dies, kill -9 included, so there is never a stale lock
to clean up. The file stays after the run (removing it would let a starter lock a file that another starter has
just unlinked); its content names the last holder, for the refusal message. Which file systems carry the lock
between machines is in the README ("One run per run directory").
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from dist_gpt.errors import QUIET_WORKER_ENV, UserError
from dist_gpt.runtime.distributed import broadcast_from_main

LOCK_FILE = "run.lock"


class RunLock:
    """`RunLock(run_dir).acquire()` or a UserError naming the holder; `release()` (or process death) frees it."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'd children (PEP 446)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                # No lock service on this file system (an NFS mount with nolock and no lockd, some FUSE ones).
                print(f"warning: cannot lock {self.path} ({e.strerror}): this file system offers no locks, so make sure no other run uses {self.path.parent}", flush=True)
                return
            who = f"pid {holder['pid']} on host {holder['host']}, started {holder['started']}" if holder else "a process that is still starting"
            stop = f"kill -TERM {holder['pid']} on {holder['host']}" if holder else "kill -TERM PID"
            raise UserError(
                f"{self.path.parent} is in use by another run ({who}): wait for it to finish, stop it ({stop} saves and exits), "
                f"or start this one elsewhere with train.run_name=OTHER_NAME"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor releases the flock
            self.fd = None


@contextlib.contextmanager
def hold_run_dir(run_dir: Path, is_main: bool):
    """Global rank 0 holds the run directory's lock while inside; when another run holds it, every rank leaves
    (none waits for a rank that has gone), rank 0 with the UserError, the others quietly with the same exit code."""
    lock = RunLock(run_dir)
    new_dir = not Path(run_dir).exists()
    refusal = None
    if is_main:
        try:
            lock.acquire()
        except UserError as e:
            refusal = str(e)
    refusal = broadcast_from_main(refusal)
    if refusal:
        if is_main or os.environ.get(QUIET_WORKER_ENV):  # under our launcher every rank's line goes to it, which says it once
            raise UserError(refusal)
        raise SystemExit(2)  # rank 0 says why, once
    try:
        yield
    except (UserError, SystemExit):
        if is_main and new_dir and [p.name for p in Path(run_dir).iterdir()] == [LOCK_FILE]:
            # A mistake found before the run wrote anything (a DeepSpeed JSON, a batch that does not divide): no
            # run directory holding only an empty-looking run.lock is left behind to puzzle over.
            lock.path.unlink()
            Path(run_dir).rmdir()
        raise
    finally:
        lock.release()


def _read_holder(fd: int) -> dict | None:
    """{pid, host, started} as the holder wrote them just after locking (None if it has not yet)."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0))
        return holder if {"pid", "host", "started"} <= set(holder) else None
    except (OSError, ValueError, TypeError):
        return None
