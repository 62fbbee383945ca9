"""User errors: one line that names the problem and the fix, a non-zero exit, no traceback."""

from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """A mistake the user can fix (bad config, missing file, wrong checkpoint). Its message is the fix."""


def cli(main):
    """Decorate a command-line entry point: a UserError prints `error: <message>` and exits 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper
