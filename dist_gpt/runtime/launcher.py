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
import logging
import os
import signal

from dist_gpt.config import Config
from dist_gpt.errors import UserError

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


def preflight(config: Config) -> None:
    """What every worker would find wrong at its start, found once before any starts (config: already loaded)."""
    from dist_gpt.data import read_meta

    read_meta(config.data_dir)


def launch(argv: list[str]) -> int:
    """Run torchrun with argv (its options, the script, the script's arguments) in this process; the exit code."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # --max-restarts: the agent's rendezvous store is shared with the workers' process group by default, and the
    # first restart then fails to connect (Gloo connectFullMesh ... Connection refused; pytorch/pytorch#135712).
    # With the store not shared, the restarted group meets on its own: the elastic restart works.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    # torch.distributed logs through its own stderr handler: its warnings and errors would follow the workers' lines
    logging.getLogger("torch.distributed").handlers = [logging.NullHandler()]
    try:
        torchrun.run(torchrun.parse_args(argv))
        return 0
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode > 0:
            return failure.exitcode  # the worker said why (our one line, or its traceback for a bug)
        name = signal.Signals(-failure.exitcode).name if -failure.exitcode in signal.valid_signals() else f"signal {-failure.exitcode}"
        raise UserError(f"rank {rank} (pid {failure.pid}) was killed by {name}{' (out of memory?)' if name == 'SIGKILL' else ''}: its last lines are above") from None
    except SignalException as e:
        return 128 + int(e.sigval)  # the agent forwarded it; the workers saved and exited (or were killed after the timeout)
