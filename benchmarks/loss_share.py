"""The loss's share of a training step, compiled vs eager, from torch.profiler: prints one JSON object.

Builds the model and strategy as training does (engine.build), runs warm-up steps on random tokens, then
profiles a few steps. `linear_cross_entropy` marks itself with record_function, so its time (its forward,
which also forms the gradients; the backward only scales them) is read from the profile: device time on a GPU, CPU
time on a CPU. The step time is the wall clock per step, synchronised.

    python benchmarks/loss_share.py --config gpt2-124m-owt --steps 5 [overrides ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from dist_gpt.config import load_config
from dist_gpt.engine.build import build, seed_everything
from dist_gpt.engine.step import train_step
from dist_gpt.parallel import BatchShape
from dist_gpt.runtime.distributed import destroy_distributed, init_distributed, pick_dtype
from dist_gpt.runtime.metrics import synchronize
from dist_gpt.runtime.precision import dtype_name

LOSS_EVENT = "linear_cross_entropy"


def measure(config, env, steps: int, warmup: int) -> dict:
    seed_everything(0)
    micro = int(config.train.micro_batch_size)
    built = build(config, env, BatchShape(micro, 1))
    shape = (micro, config.model.block_size)
    x = torch.randint(config.model.tokenizer_vocab_size, shape, device=env.device)
    y = torch.randint(config.model.tokenizer_vocab_size, shape, device=env.device)
    for _ in range(warmup):
        train_step(built.strategy, lambda: (x, y), 1, config.train.grad_clip)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if env.device.type == "cuda" else [])
    synchronize(env.device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            train_step(built.strategy, lambda: (x, y), 1, config.train.grad_clip)
        synchronize(env.device)
    step_ms = 1e3 * (time.perf_counter() - start) / steps  # under the profiler: both variants pay its overhead alike
    events = [e for e in prof.key_averages() if e.key == LOSS_EVENT]
    device_us = sum(getattr(e, "device_time_total", 0.0) or 0.0 for e in events)
    cpu_us = sum(e.cpu_time_total for e in events)
    loss_ms = (device_us if env.device.type == "cuda" and device_us else cpu_us) / 1e3 / steps
    return {"compiled": built.compiled, "step_ms": step_ms, "loss_ms": loss_ms, "loss_share": loss_ms / step_ms,
            "tokens_per_s": micro * config.model.block_size / (step_ms / 1e3), "dtype": dtype_name(env.compute_dtype)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="gpt2-124m-owt")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    base = load_config(args.config, args.overrides)
    env = init_distributed(base.train.device, base.train.dtype, base.parallel.backend)
    try:
        env = dataclasses.replace(env, compute_dtype=pick_dtype(base.train.dtype, env.device))
        results = [measure(dataclasses.replace(base, train=dataclasses.replace(base.train, compile=c)), env, args.steps, args.warmup) for c in (False, True)]
    finally:
        destroy_distributed()
    print(json.dumps({"eager": results[0], "compiled": results[1]}))


if __name__ == "__main__":
    main()
