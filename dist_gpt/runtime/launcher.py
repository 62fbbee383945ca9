"""Several training processes from `python launch/train.py --nproc_per_node=N ...`: torchrun's own machinery,
run inside this process, so that how a run ends is ours to say.

Why not only the `torchrun` command: its agent (torch/distributed/launcher/api.py, elastic/agent/server/api.py
in torch 2.13) raises ChildFailedError whenever a worker exits non-zero, and SignalException whenever it gets
SIGINT/SIGTERM itself (a terminal's Ctrl-C reaches it with its workers); its `main` is wrapped in @record,
which re-raises both, so Python prints ~30 lines of traceback after our one-line error or after "checkpoint
saved; the same command resumes", and the exit code is 1. Nothing a worker does changes that: the worker's
error file (TORCHELASTIC_ERROR_FILE, which our `cli` writes) only puts our message inside that report. Here
the same launch code runs under our try/except: a worker's error is the last line on the screen and its exit
code is ours, an interrupt exits 128 + the signal once the workers have saved, and torch's own log lines
(which would follow ours) are kept quiet. The configuration is checked once, here, before any worker starts.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

from dist_gpt.config import Config, check_runtime
from dist_gpt.errors import QUIET_WORKER_ENV, UserError

# torchrun's options that launch/train.py takes (with - or _, as torchrun): name -> (type, help).
LAUNCH_OPTIONS = {
    "nproc_per_node": (str, "processes on this machine (e.g. one per GPU), started through torchrun's machinery"),
    "nnodes": (str, "machines (or MIN:MAX for elastic runs); run the same command on each"),
    "node_rank": (int, "this machine's rank (static rendezvous with --master_addr)"),
    "rdzv_backend": (str, "rendezvous backend (default c10d when --rdzv_endpoint is given)"),
    "rdzv_endpoint": (str, "HOST:PORT where the machines meet"),
    "rdzv_id": (str, "the run's rendezvous id, the same on every machine"),
    "master_addr": (str, "static rendezvous: rank 0's address"),
    "master_port": (int, "static rendezvous: rank 0's port"),
    "max_restarts": (int, "times to restart the workers after a failure (default 0)"),
    "shutdown_timeout": (int, "seconds the workers get to save after Ctrl-C/SIGTERM before they are killed (default 300)"),
}
DEFAULT_SHUTDOWN_TIMEOUT_S = 300  # torchrun's 30 s cannot save a large model's optimizer state


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("several processes (torchrun's options, e.g. --nproc_per_node=8)")
    for name, (kind, text) in LAUNCH_OPTIONS.items():
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        group.add_argument(*flags, dest=name, type=kind, default=None, help=text)


def wants_launch(args: argparse.Namespace) -> bool:
    """Launch workers: a torchrun option was given and this process is not itself a worker of a launcher."""
    return any(getattr(args, name) is not None for name in LAUNCH_OPTIONS) and "LOCAL_RANK" not in os.environ


def torchrun_argv(args: argparse.Namespace, script: str, script_args: list[str]) -> list[str]:
    options = {name: getattr(args, name) for name in LAUNCH_OPTIONS if getattr(args, name) is not None}
    options.setdefault("shutdown_timeout", DEFAULT_SHUTDOWN_TIMEOUT_S)
    if "rdzv_endpoint" in options:
        options.setdefault("rdzv_backend", "c10d")
    one_machine = str(options.get("nnodes", "1")) in ("1", "1:1") and not {"rdzv_endpoint", "master_addr"} & set(options)
    standalone = ["--standalone"] if one_machine else []  # a free local port, no rendezvous server to name
    return standalone + [f"--{name}={value}" for name, value in options.items()] + [script, *script_args]


def preflight(config: Config, args: argparse.Namespace) -> None:
    """What every worker would find wrong at its start, found once before any starts (config: already loaded)."""
    from dist_gpt.data.prepare import prepare_command, read_meta

    read_meta(config.data_dir, prepare_command(config))
    world = _known_world_size(args)
    if world and config.train.micro_batch_size != "auto":  # a global batch that does not divide (auto: the autotuner's part)
        check_runtime(config, world, "cuda", int(config.train.micro_batch_size))  # the device is the workers' to check


def _known_world_size(args: argparse.Namespace) -> int | None:
    """nproc_per_node x nnodes when both are plain numbers (not `gpu`/`auto`, not an elastic MIN:MAX)."""
    nproc, nnodes = str(args.nproc_per_node or 1), str(args.nnodes or 1)
    return int(nproc) * int(nnodes) if nproc.isdigit() and nnodes.isdigit() else None


# Set in the workers' environment: the launcher's pid, so a worker can tell that it outlived it (exit_with_launcher).
LAUNCHER_PID_ENV = "DIST_GPT_LAUNCHER_PID"


def exit_with_launcher() -> None:
    """In a worker of our launcher (or of torchrun/deepspeed): die when the launcher dies. A launcher killed with
    SIGKILL cannot stop its workers, which would train on headless (or wait forever in start-up for a rendezvous
    store that died with it); Linux's PR_SET_PDEATHSIG sends this process SIGKILL when its parent exits. A
    parent that died before the call is caught by its pid no longer being our parent's."""
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return  # no prctl: the old behaviour (the launcher's own shutdown still stops us)
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if launcher and int(launcher) != os.getppid():
        os._exit(1)  # the launcher is already gone


def launch(argv: list[str], run_dir: Path | None = None) -> int:
    """Run torchrun with argv (its options, the script, the script's arguments) in this process; the exit code.
    run_dir: the run's directory, removed after a failure if this launch made it and left only its run.lock."""
    new_dir = run_dir is not None and not run_dir.exists()
    try:
        return _launch(argv)
    finally:
        if new_dir and run_dir.is_dir() and [p.name for p in run_dir.iterdir()] == ["run.lock"]:
            # the workers are gone: a mistake they found before writing anything leaves no directory to puzzle over
            with contextlib.suppress(OSError):
                (run_dir / "run.lock").unlink()
                run_dir.rmdir()


def _launch(argv: list[str]) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # --max-restarts: the agent's rendezvous store is shared with the workers' process group by default, and the
    # first restart then fails to connect (Gloo connectFullMesh ... Connection refused; pytorch/pytorch#135712).
    # With the store not shared, the restarted group meets on its own: the elastic restart works.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    # torch.distributed logs through its own stderr handler: its warnings and errors would follow the workers' lines
    logging.getLogger("torch.distributed").handlers = [logging.NullHandler()]
    say_restarts()
    _signal_the_workers_once()
    os.environ[QUIET_WORKER_ENV] = "1"  # a worker's error line: printed here, once, not once per rank
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
    try:
        torchrun.run(torchrun.parse_args(argv))
        return 0
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        ours = sorted((f for f in e.failures.values() if str(f.message).startswith("error: ")), key=lambda f: f.timestamp)
        if ours:  # the workers' one line (every rank may have found the same mistake): once
            sys.stderr.write(f"{ours[0].message}\n")
            return ours[0].exitcode if ours[0].exitcode > 0 else 2  # stopped by the agent after its line was written
        if failure.exitcode > 0:
            return failure.exitcode  # the worker said why (its traceback, for a bug)
        name = signal.Signals(-failure.exitcode).name if -failure.exitcode in signal.valid_signals() else f"signal {-failure.exitcode}"
        raise UserError(f"rank {rank} (pid {failure.pid}) was killed by {name}{' (out of memory?)' if name == 'SIGKILL' else ''}: its last lines are above") from None
    except SignalException as e:
        return 128 + int(e.sigval)  # the agent forwarded it; the workers saved and exited (or were killed after the timeout)


class _RestartLine(logging.Handler):
    """torch's agent decides a restart in a log record (INFO, which it would not even create at its default
    level): one line of ours on the screen instead."""

    def emit(self, record: logging.LogRecord) -> None:
        if "will restart worker group" in record.msg:
            role, state, left, most = record.args
            print(f"restarting the workers after a failure (restart {most - left + 1} of --max-restarts={most}; the failed "
                  f"worker's last lines are above): they resume from the newest checkpoint", file=sys.stderr, flush=True)


def say_restarts() -> None:
    agent = logging.getLogger("torch.distributed.elastic.agent.server.api")
    if not any(isinstance(h, _RestartLine) for h in agent.handlers):
        agent.setLevel(min(agent.getEffectiveLevel(), logging.INFO))
        agent.addHandler(_RestartLine())


def _signal_the_workers_once() -> None:
    """The agent handles the first stop signal: it relays it to the workers (each in a session of its own, out of
    the terminal's reach) and waits for them to save and exit. A later signal (a second Ctrl-C) would break that
    wait (torch raises again inside it): the launcher would exit at once and the workers die with it
    (exit_with_launcher) before they clean up and say what is kept. Instead it is relayed to the workers, who
    stop at once and say so, while the agent goes on waiting for them."""
    import psutil
    from torch.distributed.elastic.multiprocessing import api

    original = getattr(api._terminate_process_handler, "__wrapped__", api._terminate_process_handler)
    seen = []

    def handler(signum, frame):
        if not seen:
            seen.append(signum)
            original(signum, frame)
        for worker in psutil.Process().children():
            with contextlib.suppress(psutil.Error):
                worker.send_signal(signum)

    handler.__wrapped__ = original
    api._terminate_process_handler = handler
