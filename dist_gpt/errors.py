"""User errors: one line that names the problem and the fix, a non-zero exit, no traceback."""

from __future__ import annotations

import functools
import json
import os
import sys
import time


class UserError(Exception):
    """A mistake the user can fix (bad config, missing file, wrong checkpoint). Its message is the fix."""


def cli(main):
    """Decorate a command-line entry point: a UserError prints `error: <message>` and exits 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            # One write of the whole line: the ranks of a launch share the terminal, and print()'s separate
            # write of the newline let two ranks' lines run into one.
            sys.stderr.write(f"error: {e}\n")
            sys.stderr.flush()
            tell_torchrun(f"error: {e}")
            sys.exit(2)

    return wrapper


def tell_torchrun(message: str) -> None:
    """Under the `torchrun` command, also write the message where its failure report looks (the worker's error
    file): the report then names our error instead of pointing at its docs. It still prints its traceback,
    which no worker can prevent: `python launch/train.py --nproc_per_node=N` avoids it (dist_gpt/launcher.py)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        try:
            with open(path, "w") as f:
                json.dump({"message": message, "timestamp": int(time.time())}, f)
        except OSError:
            pass  # the report then says less; the message is on the screen already
