"""Parallelism strategies behind one interface (base.Strategy); `build_strategy` picks one from config."""

from __future__ import annotations

from dist_gpt.config import STRATEGIES, Config
from dist_gpt.errors import UserError
from dist_gpt.parallel.base import BatchShape, OptimizerFactory, Strategy
from dist_gpt.runtime.distributed import DistEnv

__all__ = ["BatchShape", "OptimizerFactory", "Strategy", "build_strategy", "check_strategy", "checkpoint_file_rank", "resolve_strategy_name", "strategy_class"]


def resolve_strategy_name(config: Config, env: DistEnv) -> str:
    """`auto`: deepspeed when launched with a ds_config, single on a world of one, ddp otherwise."""
    name = config.parallel.strategy
    if name == "auto":
        if config.parallel.ds_config:
            return "deepspeed"
        return "single" if env.world_size == 1 else "ddp"
    return name


def check_strategy(config: Config, env: DistEnv) -> str:
    """The strategy this run will use, after the checks that need the world size; raises UserError."""
    name = resolve_strategy_name(config, env)
    if config.parallel.ds_config and name != "deepspeed":
        raise UserError(f"a DeepSpeed config ({config.parallel.ds_config}) was given with parallel.strategy={name}: drop --ds_config, or use strategy deepspeed (or auto)")
    if name == "single" and env.world_size > 1:
        raise UserError(f"parallel.strategy=single on a world of {env.world_size} processes: use ddp, fsdp or deepspeed (or auto)")
    if name == "deepspeed" and not config.parallel.ds_config:  # config.check says so first; kept for configs built in code
        raise UserError("parallel.strategy=deepspeed needs a DeepSpeed config: launch with `deepspeed launch/train.py --ds_config ds_configs/zero2.json ...`")
    return name


def strategy_class(name: str) -> type[Strategy]:
    """The class of a strategy by name, its module imported only now (DeepSpeed's is slow to import)."""
    if name == "single":
        from dist_gpt.parallel.single import SingleDevice

        return SingleDevice
    if name == "ddp":
        from dist_gpt.parallel.ddp import DDPStrategy

        return DDPStrategy
    if name == "fsdp":
        from dist_gpt.parallel.fsdp import FSDPStrategy

        return FSDPStrategy
    if name == "deepspeed":
        from dist_gpt.parallel.deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy
    raise UserError(f"parallel.strategy={name!r} is not one of auto, {', '.join(STRATEGIES)}")


def build_strategy(config: Config, env: DistEnv) -> Strategy:
    return strategy_class(check_strategy(config, env))(config, env)


def checkpoint_file_rank(name: str) -> int | None:
    """The rank that wrote checkpoint file `name`, by the file naming of whichever strategy wrote it; None
    for a file of rank 0's."""
    ranks = (strategy_class(strategy).checkpoint_file_rank(name) for strategy in STRATEGIES)
    return next((rank for rank in ranks if rank is not None), None)
