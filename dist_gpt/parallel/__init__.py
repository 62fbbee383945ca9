"""Parallelism strategies behind one interface (base.Strategy); `build_strategy` picks one from config."""

from __future__ import annotations

from dist_gpt.config import Config
from dist_gpt.distributed import DistEnv
from dist_gpt.parallel.base import Strategy
from dist_gpt.parallel.single import SingleDevice


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
    if name == "single":
        if env.world_size > 1:
            from dist_gpt.errors import UserError

            raise UserError(f"parallel.strategy=single on a world of {env.world_size} processes: use ddp, fsdp or deepspeed (or auto)")
        return SingleDevice(config, env)
    raise NotImplementedError(f"strategy {name!r}")  # ddp / fsdp / deepspeed arrive with their own modules
