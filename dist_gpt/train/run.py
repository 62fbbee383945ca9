"""A training run from the top, what launch/train.py starts: join the process group, settle the micro-batch
(`train.micro_batch_size: auto` asks the autotuner), then hand the run to the trainer.

The micro-batch is settled here, before anything is built, so the imports point one way: the autotuner and
the trainer both build through dist_gpt.engine.build, and neither imports the other."""

from __future__ import annotations

from dist_gpt.config import Config
from dist_gpt.parallel import check_strategy
from dist_gpt.runtime.distributed import DistEnv, destroy_distributed, init_distributed
from dist_gpt.runtime.metrics import reset_peak_memory
from dist_gpt.train import loop as trainer


def run_training(config: Config) -> dict:
    """Train (or resume) the run `config` describes; returns the trainer's summary."""
    env = init_distributed(config.train.device, config.train.dtype, config.parallel.backend, cpu_tensors=config.parallel.fsdp_cpu_offload)
    try:
        with trainer.enter_run(config, env):  # before the autotuner: bad data or a busy run directory cost nothing
            return trainer.train(config, env, resolve_micro_batch_size(config, env))
    finally:
        destroy_distributed()


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
