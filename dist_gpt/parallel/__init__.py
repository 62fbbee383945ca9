"""Parallelism strategies behind one interface (base.Strategy); `build_strategy` picks one from config."""

from __future__ import annotations

from dist_gpt.config import Config
from dist_gpt.distributed import DistEnv
from dist_gpt.errors import UserError
from dist_gpt.parallel.base import Strategy
from dist_gpt.parallel.single import SingleDevice

STRATEGIES = ("single", "ddp", "fsdp", "deepspeed")


def resolve_strategy_name(config: Config, env: DistEnv) -> str:
    """`auto`: deepspeed when launched with a ds_config, single on a world of one, ddp otherwise."""
    name = config.parallel.strategy
    if name == "auto":
        if config.parallel.ds_config:
            return "deepspeed"
        return "single" if env.world_size == 1 else "ddp"
    return name


def build_strategy(config: Config, env: DistEnv) -> Strategy:
    name = resolve_strategy_name(config, env)
    if config.parallel.ds_config and name != "deepspeed":
        raise UserError(f"a DeepSpeed config ({config.parallel.ds_config}) was given with parallel.strategy={name}: drop --ds_config, or use strategy deepspeed (or auto)")
    if name == "single":
        if env.world_size > 1:
            raise UserError(f"parallel.strategy=single on a world of {env.world_size} processes: use ddp, fsdp or deepspeed (or auto)")
        return SingleDevice(config, env)
    if name == "ddp":
        from dist_gpt.parallel.ddp import DDPStrategy

        return DDPStrategy(config, env)
    if name == "fsdp":
        from dist_gpt.parallel.fsdp import FSDPStrategy

        return FSDPStrategy(config, env)
    if name == "deepspeed":
        if not config.parallel.ds_config:  # config.check says so first; kept for configs built in code
            raise UserError("parallel.strategy=deepspeed needs a DeepSpeed config: launch with `deepspeed launch/train.py --ds_config ds_configs/zero2.json ...`")
        from dist_gpt.parallel.deepspeed import DeepSpeedStrategy  # imports deepspeed (slow): only when used

        return DeepSpeedStrategy(config, env)
    raise UserError(f"parallel.strategy={name!r} is not one of auto, {', '.join(STRATEGIES)}")
