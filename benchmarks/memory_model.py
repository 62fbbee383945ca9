"""The memory model (dist_gpt.autotune.memory) against measurement: predicted vs measured peak, per shape and micro-batch.

Each measurement is an autotuner trial (dist_gpt.autotune): a fresh process running real training steps
of the real model and strategy, whose peak is the resident set on CPU and max_memory_allocated + the CUDA
context on GPU. `--live` adds, on CPU, the live-tensor peak from the profiler's allocation events: the model's
tensor terms are checked against that exactly, and the gap to the resident peak is the heap's slack.

    python benchmarks/memory_model.py                          # the calibration set (tests/test_autotune.py: within 15%)
    python benchmarks/memory_model.py --live                   # + live-tensor peaks
    python benchmarks/memory_model.py --config bible-seed --sizes 1,4,16 [section.key=value ...]
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from dist_gpt.autotune import measure_sizes, memory
from dist_gpt.config import Config, from_dict, load_config
from dist_gpt.parallel import resolve_strategy_name
from dist_gpt.runtime.distributed import init_distributed

# Small enough for a few seconds per trial on 2 CPU cores, different enough to exercise the terms: RoPE vs
# learned positions, chunked vs plain loss (one chunk buffer whatever the batch vs N x V logits growing with
# it), 2 vs 4 layers. tests/test_autotune.py holds the model to these.
CALIBRATION: dict[str, tuple[dict, list[int]]] = {
    "rope-chunked": (dict(n_layer=2, n_head=2, n_embd=256, block_size=256, vocab_size=16384, tokenizer_vocab_size=16384, loss_chunk_tokens=1024), [1, 4, 16]),
    "learned-plain": (dict(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=8192, tokenizer_vocab_size=8192, position="learned", loss="plain"), [2, 8, 32]),
}


def calibration_config(name: str, device: str = "cpu") -> Config:
    model, _ = CALIBRATION[name]
    return from_dict({"name": name, "model": model, "train": {"device": device}})


def live_tensor_peak(config: Config, micro_batch: int, steps: int = 2) -> int:
    """Peak bytes held by tensors during `steps` training steps in this process (CPU), from the profiler's
    allocation events: exact, and blind to how the heap lays them out."""
    from torch.profiler import ProfilerActivity, profile

    from dist_gpt.autotune import run_steps
    from dist_gpt.runtime.distributed import DistEnv

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run_steps(config, DistEnv(), micro_batch, 1, steps)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def report(config: Config, sizes: list[int], live: bool) -> list[float]:
    env = init_distributed(config.train.device, config.train.dtype, config.parallel.backend)
    rows = measure_sizes(config, env, resolve_strategy_name(config, env), sizes)
    print(f"\n{config.name}: {dataclasses.asdict(config.model.gpt_config())}")
    print(memory.table([b for b, _ in rows]))
    print(f"{'micro-batch':>11} {'predicted MB':>13} {'measured MB':>12} {'error':>7}" + (f" {'live pred MB':>13} {'live meas MB':>13} {'error':>7}" if live else ""))
    errors = []
    for breakdown, result in rows:
        error = breakdown.total / result.peak_bytes - 1
        errors.append(error)
        line = f"{breakdown.micro_batch:>11} {breakdown.total / memory.MB:>13,.1f} {result.peak_bytes / memory.MB:>12,.1f} {error:>+7.1%}"
        if live and env.device.type == "cpu":
            measured_live = live_tensor_peak(config, breakdown.micro_batch)
            line += f" {breakdown.tensors / memory.MB:>13,.1f} {measured_live / memory.MB:>13,.1f} {breakdown.tensors / measured_live - 1:>+7.1%}"
        print(line, flush=True)
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="a preset or YAML (default: the calibration set)")
    parser.add_argument("--sizes", type=lambda text: [int(s) for s in text.split(",")], default=[1, 4, 16], help="micro-batches, comma-separated")
    parser.add_argument("--live", action="store_true", help="CPU: also the live-tensor peak (profiler)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.config:
        errors = report(load_config(args.config, args.overrides), args.sizes, args.live)
    else:
        errors = [e for name, (_, sizes) in CALIBRATION.items() for e in report(calibration_config(name), sizes, args.live)]
    print(f"\nlargest error: {max(errors, key=abs):+.1%} over {len(errors)} measurements")


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    main()
