"""A training run from the top, what launch/train.py starts: join the process group, settle the micro-batch
(`train.micro_batch_size: auto` asks the autotuner), then hand the run to the trainer.

The micro-batch is settled here, before anything is built, so the imports point one way: the autotuner and
the trainer both build through dist_gpt.engine.build, and neither imports the other."""

from __future__ import annotations

import dataclasses
import signal

from dist_gpt.checkpoint.manifest import read_manifest
from dist_gpt.checkpoint.resume import checkpoint_to_resume
from dist_gpt.checkpoint.storage import LocalStorage
from dist_gpt.config import Config
from dist_gpt.errors import UserError
from dist_gpt.parallel import check_strategy
from dist_gpt.runtime.distributed import DistEnv, destroy_distributed, init_distributed
from dist_gpt.runtime.metrics import reset_peak_memory
from dist_gpt.train import loop as trainer


def run_training(config: Config) -> dict:
    """Train (or resume) the run `config` describes; returns the trainer's summary."""
    env = init_distributed(config.train.device, config.train.dtype, config.parallel.backend, cpu_tensors=config.parallel.fsdp_cpu_offload)
    try:
        with trainer.enter_run(config, env):  # before the autotuner: bad data or a busy run directory cost nothing
            config = keep_global_batch(config, env)
            return trainer.train(config, env, resolve_micro_batch_size(config, env))
    finally:
        destroy_distributed()


def exit_status(summary: dict) -> int:
    """The process's exit code for a run that returned: 130 (128 + SIGINT, as a shell reports it) when Ctrl-C
    stopped it, so that a script going on after training (launch/quickstart.sh samples) stops too; else 0 (a
    scheduler's SIGTERM/SIGUSR1 and the time limit end a run as planned: saved, to be resumed)."""
    return 128 + signal.SIGINT if summary.get("stopped_by") == "SIGINT" else 0


def keep_global_batch(config: Config, env: DistEnv) -> Config:
    """A config whose global batch is its micro-batch x world (global_batch_size 0) gets a fixed one, before the
    autotuner runs: a resumed run the checkpoint's (on another number of processes grad-accum changes, not the
    batch), and `train.micro_batch_size=auto` over a number that number's x world (the autotuner only splits it)."""
    if config.train.global_batch_size:
        return config
    resumed = _resumed_global_batch(config)
    keep = resumed or (config.micro_batch_before_auto or 0) * env.world_size
    if not keep or (config.train.micro_batch_size != "auto" and keep == int(config.train.micro_batch_size) * env.world_size):
        return config  # 0 already means it
    if resumed and config.train.micro_batch_size != "auto":
        micro, now = int(config.train.micro_batch_size), int(config.train.micro_batch_size) * env.world_size
        if resumed % now:  # cannot be split so: say it, rather than stop a resume on another world size
            if env.is_main:
                print(f"warning: the checkpoint's global batch of {resumed} sequences cannot be split into micro-batch {micro} x world "
                      f"{env.world_size}: training with {now} (train.global_batch_size=0); a micro-batch dividing {resumed // env.world_size or 1} keeps it", flush=True)
            return config
        if env.is_main:
            print(f"global batch kept at the checkpoint's {resumed} sequences (train.global_batch_size=0 would make it micro-batch "
                  f"{micro} x world {env.world_size}): grad-accum makes up the difference", flush=True)
    return dataclasses.replace(config, train=dataclasses.replace(config.train, global_batch_size=keep))


def _resumed_global_batch(config: Config) -> int:
    """The global batch of the checkpoint this run will resume (0: none, or one from before it was recorded)."""
    ckpt_dir, _ = checkpoint_to_resume(config, LocalStorage(config.run_dir / "checkpoints"))
    if ckpt_dir is None:
        return 0
    try:
        return int(read_manifest(ckpt_dir)["parts"]["train_state"].get("global_batch", 0))
    except (UserError, KeyError):
        return 0  # a damaged checkpoint: the resume says so, with the fix


def resolve_micro_batch_size(config: Config, env: DistEnv) -> int:
    """The configured micro-batch, or for `auto` the autotuner's choice (every rank gets the same)."""
    strategy_name = check_strategy(config, env)  # a wrong strategy for this world is said before any tuning
    if config.train.micro_batch_size != "auto":
        return int(config.train.micro_batch_size)
    from dist_gpt.autotune import autotune_for_training  # the autotuner's imports (subprocess trials...) only when used

    micro_batch = autotune_for_training(config, env, strategy_name)
    # In-process trials (on CUDA; OOM attempts included) raised this process's peak: every log line would show
    # the trials' peak instead of training's.
    reset_peak_memory(env.device)
    return micro_batch
