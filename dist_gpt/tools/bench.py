"""Measure training throughput: `python -m dist_gpt.bench --config bible-seed [--steps N] [--strategy S] [--json]`.

Times real training steps (the strategy's forward/backward and optimizer step, one micro-batch per step) after
warm-up, and prints tokens/s, MFU against the device's peak (on CPU a matmul measured once per machine; the data sheet on known
GPUs), ms per step split into data / forward / backward / optimizer, page faults per step and peak memory.

`--compare A B ...` builds one model per variant (each a quoted list of overrides) and runs their steps
interleaved, A B A B ..., in one process, so a slow moment of a noisy machine hits every variant alike; it
prints each variant's ratio to the first. Besides config keys, a variant may say `malloc=default` (glibc's
initial malloc settings: big blocks mmapped and unmapped every step) or `malloc=kept` (freed memory kept for
reuse, what the trainer uses on CPU): e.g.

    python -m dist_gpt.bench --config bible-seed --compare "model.loss=plain malloc=default" "model.loss=chunked"
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import statistics
import time
from dataclasses import dataclass, field

import psutil
import torch

from dist_gpt.config import Config, load_config
from dist_gpt.engine.build import build, seed_everything
from dist_gpt.engine.step import accumulate_gradients, apply_update
from dist_gpt.errors import UserError, cli, run_worker_entry_point
from dist_gpt.parallel import BatchShape
from dist_gpt.runtime import malloc as runtime
from dist_gpt.runtime.distributed import DistEnv, destroy_distributed, init_distributed, pick_dtype
from dist_gpt.runtime.metrics import PeakFlops, device_peak, synchronize
from dist_gpt.runtime.precision import dtype_name

PHASES = ("data", "forward", "backward", "optimizer")


@dataclass
class Variant:
    label: str
    config: Config
    malloc: str  # "kept" | "default"
    env: DistEnv = None  # the process's, with this variant's compute dtype (train.dtype)
    peak: PeakFlops = None  # its dtype's peak: MFU of a bf16 variant against the bf16 peak
    strategy: object = None
    flops_per_token: int = 0
    tokens_per_step: int = 0
    times: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PHASES})
    page_faults: list[int] = field(default_factory=list)
    peak_memory_mb: float = 0.0
    marks: list[tuple[float, float]] = field(default_factory=list)  # (time, memory) at the end of each forward


def split_variant(spec: str) -> tuple[list[str], str]:
    """'model.loss=plain malloc=default' -> (config overrides, malloc mode)."""
    overrides, malloc = [], "kept"
    for item in shlex.split(spec):
        if item.startswith("malloc="):
            malloc = item.partition("=")[2]
            if malloc not in ("kept", "default"):
                raise UserError(f"{item!r}: malloc must be 'kept' or 'default'")
        else:
            overrides.append(item)
    return overrides, malloc


def set_malloc(mode: str) -> None:
    if mode == "kept":
        runtime.keep_freed_memory()
    else:
        runtime.restore_default_malloc()


def current_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return psutil.Process().memory_info().rss / 2**20


def build_variant(variant: Variant) -> Variant:
    config, env = variant.config, variant.env
    micro = config.train.micro_batch_size
    set_malloc(variant.malloc)  # before this variant allocates anything
    built = build(config, env, BatchShape(micro, 1))
    variant.flops_per_token = built.flops_per_token
    variant.tokens_per_step = micro * env.world_size * config.model.block_size
    # The end of the model's forward (a hook on the plain GPT, inside any wrapper) splits forward from backward.
    built.model.register_forward_hook(lambda module, args, output: variant.marks.append(_mark(env.device)))
    variant.strategy = built.strategy
    return variant


def _mark(device: torch.device) -> tuple[float, float]:
    synchronize(device)
    return time.perf_counter(), current_memory_mb(device)


def random_batch(config: Config, env: DistEnv, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniformly random GPT-2 token ids: throughput does not depend on the text."""
    shape = (int(config.train.micro_batch_size), config.model.block_size + 1)
    rows = torch.randint(0, config.model.tokenizer_vocab_size, shape, generator=generator)
    rows = rows.to(env.device, non_blocking=True)
    return rows[:, :-1], rows[:, 1:]


def run_step(variant: Variant, generator: torch.Generator, record: bool) -> None:
    env = variant.env
    set_malloc(variant.malloc)
    device, strategy = env.device, variant.strategy
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    faults_before = runtime.page_faults()
    variant.marks = []
    t0 = time.perf_counter()
    x, y = random_batch(variant.config, env, generator)
    synchronize(device)
    t1 = time.perf_counter()
    loss = accumulate_gradients(strategy, lambda: (x, y), grad_accum=1)
    synchronize(device)
    t3 = time.perf_counter()
    apply_update(strategy, loss, variant.config.train.grad_clip)
    synchronize(device)
    t4 = time.perf_counter()
    if not record:
        return
    t2, memory_after_forward = variant.marks[-1] if variant.marks else (t3, 0.0)
    for phase, seconds in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
        variant.times[phase].append(seconds)
    variant.page_faults.append(runtime.page_faults() - faults_before)
    variant.peak_memory_mb = max(variant.peak_memory_mb, memory_after_forward, current_memory_mb(device))


def summarize(variant: Variant, world_size: int) -> dict:
    step_times = [sum(parts) for parts in zip(*(variant.times[p] for p in PHASES))]
    median_step = statistics.median(step_times)
    tokens_per_s = variant.tokens_per_step / median_step
    return {
        "variant": variant.label,
        "tokens_per_s": tokens_per_s,
        "dtype": dtype_name(variant.env.compute_dtype),
        "mfu": variant.peak.mfu(tokens_per_s * variant.flops_per_token / world_size),
        "peak_tflops": variant.peak.flops / 1e12,
        "peak_source": variant.peak.source,
        "ms_per_step": 1e3 * median_step,
        **{f"ms_{p}": 1e3 * statistics.median(variant.times[p]) for p in PHASES},
        "page_faults_per_step": statistics.median(variant.page_faults),
        "peak_memory_mb": variant.peak_memory_mb,
        "steps_timed": len(step_times),
    }


def bench(base: str, variant_specs: list[str], common: list[str], steps: int, warmup: int) -> tuple[list[dict], dict]:
    variants = []
    for spec in variant_specs:
        overrides, malloc = split_variant(spec)
        config = load_config(base, common + overrides)
        if config.train.micro_batch_size == "auto":
            raise UserError("bench needs a fixed train.micro_batch_size (run python -m dist_gpt.autotune_batch first)")
        variants.append(Variant(spec or "default", config, malloc))
    first = variants[0].config.train
    env = init_distributed(first.device, first.dtype, variants[0].config.parallel.backend)
    try:
        seed_everything(0)
        # Each variant computes in its own train.dtype (--compare "train.dtype=fp32" "train.dtype=bf16"), measured
        # against that dtype's peak. The peaks before building the variants: compile workers and model
        # construction would contend with the measurement.
        peaks = {}
        for variant in variants:
            variant.env = dataclasses.replace(env, compute_dtype=pick_dtype(variant.config.train.dtype, env.device))
            dtype = variant.env.compute_dtype
            variant.peak = peaks[dtype] = peaks.get(dtype) or device_peak(env.device, dtype, variant.config.train.peak_tflops)
        for variant in variants:
            build_variant(variant)
        generator = torch.Generator().manual_seed(0)
        for step in range(warmup + steps):
            for variant in variants:  # interleaved: A B A B ...
                run_step(variant, generator, record=step >= warmup)
        results = [summarize(v, env.world_size) for v in variants]
        for r in results:
            r["ratio_to_first"] = r["tokens_per_s"] / results[0]["tokens_per_s"]
        v0 = variants[0]
        context = {
            "config": base,
            "device": torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
            "dtype": " / ".join(dict.fromkeys(r["dtype"] for r in results)),
            "world_size": env.world_size,
            "strategy": v0.strategy.name,
            "micro_batch_size": v0.config.train.micro_batch_size,
            "block_size": v0.config.model.block_size,
            "peak_tflops": v0.peak.flops / 1e12,
            "peak_source": v0.peak.source,
            "attention": v0.strategy.unwrapped_model.attention_backend(v0.env.compute_dtype) if v0.strategy.unwrapped_model is not None else "?",
            "steps": steps,
            "warmup": warmup,
            "is_main": env.is_main,
        }
        return results, context
    finally:
        destroy_distributed()


def format_table(results: list[dict], context: dict) -> str:
    lines = [
        f"{context['config']} | {context['strategy']} x {context['world_size']} on {context['device']} | {context['dtype']} | "
        f"micro-batch {context['micro_batch_size']} x block {context['block_size']} | attention {context['attention']} | "
        f"peak {context['peak_tflops']:.3f} TFLOP/s ({context['peak_source']}) | median of {context['steps']} steps after {context['warmup']} warm-up",
        f"{'variant':40s} {'dtype':>5s} {'tok/s':>10s} {'MFU':>6s} {'ms/step':>8s} {'data':>6s} {'fwd':>7s} {'bwd':>7s} {'optim':>7s} {'faults/step':>11s} {'peak MB':>8s} {'ratio':>6s}",
    ]
    for r in results:
        lines.append(
            f"{r['variant'][:40]:40s} {r['dtype']:>5s} {r['tokens_per_s']:10,.0f} {100 * r['mfu']:5.1f}% {r['ms_per_step']:8.1f} {r['ms_data']:6.1f} "
            f"{r['ms_forward']:7.1f} {r['ms_backward']:7.1f} {r['ms_optimizer']:7.1f} {r['page_faults_per_step']:11,.0f} "
            f"{r['peak_memory_mb']:8,.0f} {r['ratio_to_first']:6.2f}"
        )
    return "\n".join(lines)


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="bible-seed")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator warm-up, compilation)")
    parser.add_argument("--strategy", default="", help="parallel.strategy for every variant")
    parser.add_argument("--compare", nargs="+", default=None, metavar="VARIANT", help='quoted override lists, e.g. "model.loss=plain" (put it last)')
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("overrides", nargs="*", help="overrides for every variant, e.g. train.micro_batch_size=8")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        raise UserError("--steps must be at least 1 and --warmup at least 0")
    common = list(args.overrides) + ([f"parallel.strategy={args.strategy}"] if args.strategy else [])
    results, context = bench(args.config, args.compare or [""], common, args.steps, args.warmup)
    if not context.pop("is_main"):
        return
    print(json.dumps({"context": context, "results": results}, indent=1) if args.json else format_table(results, context))


if __name__ == "__main__":
    run_worker_entry_point(main)  # under torchrun: the same clean exit as launch/train.py
