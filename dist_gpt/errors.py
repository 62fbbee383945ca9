"""User errors: one line that names the problem and the fix, a non-zero exit, no traceback."""

from __future__ import annotations

import functools
import json
import os
import sys
import time


class UserError(Exception):
    """A mistake the user can fix (bad config, missing file, wrong checkpoint). Its message is the fix."""


class Interrupted(KeyboardInterrupt):
    """A second Ctrl-C stopped the run at once; its message says what was kept (printed by `cli`, exit 130)."""


QUIET_WORKER_ENV = "DIST_GPT_QUIET_WORKER"  # set by our launcher: it prints a worker's error line, once for all ranks
INTERRUPTED_EXIT = 130  # 128 + SIGINT, as a shell reports a Ctrl-C'd command
BROKEN_PIPE_EXIT = 141  # 128 + SIGPIPE, as `yes | head` ends


def cli(main):
    """Decorate a command-line entry point: a UserError prints `error: <message>` and exits 2; Ctrl-C outside
    the training loop's own handling prints one line and exits 130; a reader that went away (`| head`) ends it
    quietly."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            result = main(*args, **kwargs)
            sys.stdout.flush()  # here, not at exit: a closed pipe is then ours to handle
            return result
        except UserError as e:
            if not (os.environ.get(QUIET_WORKER_ENV) and tell_torchrun(f"error: {e}")):
                # One write of the whole line: the ranks of a launch share the terminal, and print()'s separate
                # write of the newline let two ranks' lines run into one.
                sys.stderr.write(f"error: {e}\n")
                sys.stderr.flush()
                tell_torchrun(f"error: {e}")
            sys.exit(2)
        except KeyboardInterrupt as e:
            if os.environ.get("RANK", "0") == "0":
                sys.stderr.write(f"{e if isinstance(e, Interrupted) else 'interrupted (Ctrl-C)'}\n")
            sys.exit(INTERRUPTED_EXIT)
        except BrokenPipeError:
            # What the reader wanted is shown; the interpreter's own flush at exit must not fail again on stdout.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(BROKEN_PIPE_EXIT)

    return wrapper


def run_worker_entry_point(main) -> None:
    """Run a training entry point; in a process a launcher started (LOCAL_RANK set: torchrun, deepspeed, ours),
    end it with os._exit and the code the run earned, skipping the interpreter's and C++'s teardown.

    Why: finished 2-process gloo runs (FSDP2, ZeRO-3 offload) aborted in that teardown now and then, after the
    run had saved, closed its metrics and left the process group ("terminate called without an active
    exception", SIGABRT; ~1 in 6 runs of a tiny FSDP2 job here, and a barrier before leaving the group did not
    help), and the launcher then reports a finished run as a failed one. By the time main returns everything
    the run keeps is on disk, so the teardown has nothing left to do for us."""
    if "LOCAL_RANK" not in os.environ:  # a process of its own: the interpreter's ordinary exit
        main()
        return
    try:
        main()
        code = 0
    except SystemExit as stop:
        code = stop.code
    if code is not None and not isinstance(code, int):  # sys.exit("message"): print it as Python would
        sys.stderr.write(f"{code}\n")
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def tell_torchrun(message: str) -> bool:
    """Under the `torchrun` command, also write the message where its failure report looks (the worker's error
    file): the report then names our error instead of pointing at its docs. It still prints its traceback,
    which no worker can prevent: `python launch/train.py --nproc_per_node=N` avoids it (dist_gpt/runtime/launcher.py)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        try:
            with open(path, "w") as f:
                json.dump({"message": message, "timestamp": int(time.time())}, f)
            return True
        except OSError:
            pass  # the report then says less; the message is on the screen already
    return False


def read_json_file(path, missing: str, corrupt: str) -> dict:
    """The JSON document in `path` (a file we wrote: meta.json, a manifest); UserError(missing) when there is
    none, UserError(corrupt) when it does not parse (a crash mid-write on an old version, a hand edit)."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise UserError(missing)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(corrupt) from None
