"""How much memory a rank may fill, and the memory model (dist_gpt.autotune.memory) set up for this run."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dist_gpt.autotune import memory
from dist_gpt.autotune.measure import resident_bytes
from dist_gpt.autotune.memory import GB, MB
from dist_gpt.autotune.search import Search
from dist_gpt.config import Config
from dist_gpt.errors import UserError
from dist_gpt.runtime.distributed import DistEnv
from dist_gpt.runtime.precision import dtype_name

if TYPE_CHECKING:
    from dist_gpt.autotune.trials import TrialRunner

CPU_BUDGET_STEP = 256 * MB  # the default CPU budget is rounded down to this: the same answer (and cache) run after run


def default_budget_bytes(env: DistEnv) -> float:
    """The whole card on CUDA. On CPU, the RAM this process may grow into: what it holds now plus its share
    (over the ranks on this host) of what is available, within a cgroup limit if one is set; rounded down to
    CPU_BUDGET_STEP, since what is available moves a little from one run to the next."""
    if env.device.type == "cuda":
        return torch.cuda.get_device_properties(env.device).total_memory
    import psutil

    available = psutil.virtual_memory().available
    cgroup_room = _cgroup_room_bytes()
    if cgroup_room is not None:
        available = min(available, cgroup_room)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
    share = resident_bytes() + available / max(1, local_ranks)
    return max(CPU_BUDGET_STEP, share // CPU_BUDGET_STEP * CPU_BUDGET_STEP)


def _cgroup_room_bytes() -> int | None:
    """limit - usage of this container's memory cgroup (v2, then v1); None when unlimited."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit, usage = Path(limit_file).read_text().strip(), int(Path(usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 1 << 60:
            return None
        return max(0, int(limit) - usage)
    return None


def memory_strategy(config: Config, strategy_name: str) -> tuple[str, bool]:
    """(the memory model's strategy name, CPU offload) for this run's strategy."""
    p = config.parallel
    if strategy_name == "fsdp":
        return ("fsdp" if p.fsdp_reshard_after_forward else "fsdp-no-reshard"), p.fsdp_cpu_offload
    if strategy_name == "deepspeed":
        from dist_gpt.parallel.deepspeed import load_ds_config

        zero = load_ds_config(p.ds_config).get("zero_optimization", {})
        offload = any(zero.get(k, {}).get("device", "none") != "none" for k in ("offload_optimizer", "offload_param"))
        return f"zero{int(zero.get('stage', 0))}", offload
    return strategy_name, False


def ds_global_batch(config: Config, strategy_name: str) -> int:
    """A DeepSpeed JSON may pin the global batch (train_batch_size); it must leave the micro-batch to us."""
    if strategy_name != "deepspeed":
        return 0
    from dist_gpt.parallel.deepspeed import load_ds_config

    ds = load_ds_config(config.parallel.ds_config)
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if ds.get(key, "auto") != "auto":
            raise UserError(f'{config.parallel.ds_config} fixes {key}={ds[key]}: set it to "auto" to let the autotuner choose')
    value = ds.get("train_batch_size", "auto")
    return 0 if value == "auto" else int(value)


class RunMemoryModel:
    """dist_gpt.autotune.memory set up for this run: its shape, strategy, world, dtype and device, and the overhead
    the trials measured (CUDA context, idle CPU process) once they have."""

    def __init__(self, config: Config, env: DistEnv, strategy_name: str, runner: TrialRunner):
        self.shape = config.model.gpt_config()
        self.strategy, self.offload = memory_strategy(config, strategy_name)
        self.world_size, self.device = env.world_size, env.device.type
        self.dtype = dtype_name(env.compute_dtype)  # the memory model's dtype names are train.dtype's
        self.runner = runner

    def __call__(self, micro_batch: int, checkpointing: bool, shape=None, strategy: str | None = None, offload: bool | None = None) -> float:
        """Predicted peak bytes; shape/strategy/offload replace the run's (for 'what would fit instead')."""
        return self.breakdown(micro_batch, checkpointing, shape, strategy, offload).total

    def breakdown(self, micro_batch: int, checkpointing: bool, shape=None, strategy=None, offload=None) -> memory.Breakdown:
        return memory.predict(
            shape or self.shape, micro_batch, strategy or self.strategy, self.world_size, self.dtype, checkpointing,
            self.offload if offload is None else offload, device=self.device,
            grad_accum=self.runner.micro_steps(micro_batch), overhead_bytes=self.runner.overhead_bytes or None,
        )

    def largest(self, limit_bytes: float, checkpointing: bool) -> int:
        """The model's largest fitting size (a start for the search, never the answer)."""
        return memory.largest_fitting(
            limit_bytes, self.shape, self.strategy, self.world_size, self.dtype, checkpointing, self.offload, device=self.device,
            grad_accum=2 if self.runner.global_batch else 1, overhead_bytes=self.runner.overhead_bytes or None,
        )


def nothing_fits_message(search: Search, limit: float, budget: float, headroom: float, model: RunMemoryModel, config: Config) -> str:
    """One line: what micro-batch 1 needs, and what the model says the ways out would need (scaled by how far
    the measurement at micro-batch 1 was from the model)."""
    ac = config.parallel.activation_checkpointing
    row = next((r for r in search.tried if r.micro_batch == 1), search.tried[-1])
    predicted_one = model(1, ac)
    measured = 0 if row.result.oom else row.result.peak_bytes
    scale = measured / predicted_one if measured else 1.0
    need = f"needs {measured / GB:.2f} GB (measured)" if measured else f"ran out of memory (predicted {predicted_one / GB:.2f} GB)"
    options = []
    if not ac:
        options.append(("parallel.activation_checkpointing=true", model(1, True)))
    if model.shape.block_size >= 128:
        half = model.shape.block_size // 2
        options.append((f"model.block_size={half}", model(1, ac, shape=dataclasses.replace(model.shape, block_size=half))))
    if not model.offload:
        if model.strategy.startswith("fsdp"):
            options.append(("parallel.fsdp_cpu_offload=true", model(1, ac, offload=True)))
        else:
            options.append(("DeepSpeed ZeRO-3 offload (--ds_config ds_configs/zero3-offload.json)", model(1, ac, strategy="zero3", offload=True)))
    said = "; ".join(f"{label} ~{p * scale / GB:.2f} GB{' (fits)' if p * scale <= limit else ''}" for label, p in options)
    return (f"micro-batch 1 {need} but the limit is {limit / GB:.2f} GB (budget {budget / GB:.2f} GB less {headroom:.0%} headroom); "
            f"predicted at micro-batch 1 with {said}")
