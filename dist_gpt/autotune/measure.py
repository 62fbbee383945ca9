"""One trial's training steps, run in this process: the real model and strategy, random tokens."""

from __future__ import annotations

import dataclasses
import gc
import time

import torch

from dist_gpt.config import Config
from dist_gpt.engine.build import build
from dist_gpt.engine.step import train_step
from dist_gpt.parallel import BatchShape
from dist_gpt.runtime.distributed import DistEnv
from dist_gpt.runtime.precision import enable_tf32

TRIAL_STEPS = 3  # optimizer steps per trial: AdamW's moments appear in step 1, so step 2 is the steady state


def trial_config(config: Config, checkpointing: bool) -> Config:
    parallel = dataclasses.replace(config.parallel, activation_checkpointing=checkpointing)
    return dataclasses.replace(config, parallel=parallel)


def run_steps(config: Config, env: DistEnv, micro_batch: int, micro_steps: int, steps: int = TRIAL_STEPS) -> tuple[bool, float]:
    """Train `steps` optimizer steps of `micro_steps` micro-batches on random tokens, here, with the real
    model and strategy. Returns (ran out of memory, tokens/s over all ranks after the first step).

    After an OOM everything the step held is released before returning: the except block is left first,
    so the traceback (whose frames hold the model, the optimizer and the activations) is gone before
    gc.collect() and empty_cache() run."""
    speed, oom = 0.0, False
    try:
        speed = _timed_steps(config, env, micro_batch, micro_steps, steps)
    except torch.OutOfMemoryError:
        oom = True
    except RuntimeError as e:  # the CPU allocator's failure is a plain RuntimeError
        # oneDNN (bf16 matmuls on CPU) reports a failed scratch allocation as "could not create a primitive"
        if not any(text in str(e) for text in ("can't allocate memory", "DefaultCPUAllocator", "could not create a primitive")):
            raise
        oom = True
    except MemoryError:
        oom = True
    gc.collect()
    if env.device.type == "cuda":
        torch.cuda.empty_cache()
    return oom, speed


def _timed_steps(config: Config, env: DistEnv, micro_batch: int, micro_steps: int, steps: int) -> float:
    # Random weights of the configured shape (memory and speed depend on the shapes, not on the values), and the
    # program training runs: compiled as train.compile says and with TF32 on CUDA, as init_distributed sets it
    # (an eager trial holds other activations and runs at another speed than the compiled training it sizes).
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, init_from="scratch"))
    if env.device.type == "cuda":
        enable_tf32()  # a trial subprocess did not go through init_distributed
    strategy = build(config, env, BatchShape(micro_batch, micro_steps)).strategy
    shape = (micro_batch, config.model.block_size)
    x = torch.randint(config.model.tokenizer_vocab_size, shape, device=env.device)
    y = torch.randint(config.model.tokenizer_vocab_size, shape, device=env.device)
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        train_step(strategy, lambda: (x, y), micro_steps, config.train.grad_clip)  # the grad norm is a float: the device has finished
        seconds.append(time.perf_counter() - start)
    timed = seconds[1:] or seconds  # the first step allocates the optimizer state and warms kernels up
    return micro_batch * micro_steps * config.model.block_size * env.world_size * len(timed) / sum(timed)


def cuda_overhead_bytes(device: torch.device) -> int:
    """Device memory this process cannot allocate and max_memory_allocated does not count: our CUDA context
    and whatever other processes hold on the card."""
    free, total = torch.cuda.mem_get_info(device)
    return max(0, total - free - torch.cuda.memory_reserved(device))


def resident_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss
