"""Validation loss during training: the same fixed windows every time, on any world size."""

from __future__ import annotations

import math

import numpy as np
import torch

from dist_gpt.config import Config
from dist_gpt.data import TokenLoader
from dist_gpt.parallel import Strategy
from dist_gpt.runtime.distributed import DistEnv, all_reduce_sum


@torch.no_grad()
def evaluate(strategy: Strategy, config: Config, env: DistEnv, micro_batch_size: int) -> float:
    """Mean val loss over one fixed set of windows (eval_batches x micro_batch_size of them, a fixed seed), so
    successive evals compare the model, not the sample, and any world size evaluates the same windows: rank r
    takes windows r, r + world, r + 2 world, ... Every rank runs the same number of forwards (a sharded model
    gathers inside forward), a rank with nothing left running a zero-weight one."""
    loader = TokenLoader(config.data_dir / "val.bin", config.model.block_size, micro_batch_size, seed=config.train.seed + 1, device=env.device)
    mine = np.arange(env.rank, config.train.eval_batches * micro_batch_size, env.world_size)
    forwards = math.ceil(math.ceil(config.train.eval_batches * micro_batch_size / env.world_size) / micro_batch_size)
    loss_sum = torch.zeros((), device=env.device, dtype=torch.float64)
    windows = torch.zeros((), device=env.device, dtype=torch.float64)
    for i in range(forwards):
        numbers = mine[i * micro_batch_size : (i + 1) * micro_batch_size]
        x, y = loader.windows(numbers if len(numbers) else np.zeros(1, np.int64))
        loss = strategy.eval_loss(x, y).double()
        loss_sum += loss * len(numbers)  # every window has block_size targets: weighting by windows is exact
        windows += len(numbers)
    return (all_reduce_sum(loss_sum) / all_reduce_sum(windows)).item()
