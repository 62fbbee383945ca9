"""Writing files that can fail half-way (a full disk): replace atomically, and say in one line what went wrong."""

from __future__ import annotations

import os
from pathlib import Path

from torch.distributed.checkpoint import CheckpointException


def write_atomically(path: Path, text: str) -> None:
    """Write to a temporary name, fsync, rename: a reader sees the old content or the new, never half."""
    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk must not leave half a file behind
        raise


def attempt_write(fn, *args):
    """(fn(*args), None), or (None, what went wrong) when it failed to write (a full disk...)."""
    try:
        return fn(*args), None
    except (OSError, RuntimeError) as e:
        return None, describe_write_error(e)


def describe_write_error(error: BaseException) -> str:
    """One line for a failed write; anything that is not one is a bug and is raised again. A failed write is
    an OSError, or torch.save's RuntimeError from its zip writer ("inline_container": how it reports a short
    write, e.g. on a full disk), either possibly inside DCP's CheckpointException (one per failing rank)."""
    causes = [exc for exc, _ in error.failures.values()] if isinstance(error, CheckpointException) else [error]
    for cause in causes:
        if isinstance(cause, OSError):
            return f"{cause.strerror or cause} ({cause.filename})" if cause.filename else str(cause)
        if isinstance(cause, RuntimeError) and "inline_container" in str(cause):
            return f"torch.save could not write its file ({str(cause).split('] ')[-1].strip(' .')}: a full disk?)"
        if isinstance(cause, RuntimeError) and str(cause).startswith("Parent directory"):  # torch.save into a missing directory
            return str(cause).rstrip(".")
    raise error
