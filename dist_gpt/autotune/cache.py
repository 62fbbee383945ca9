"""The autotuner's answers on disk, keyed by everything they depend on: a second run reads the answer."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch

from dist_gpt.autotune.budget import memory_strategy
from dist_gpt.autotune.search import Outcome, TrialResult, Tried
from dist_gpt.config import Config
from dist_gpt.runtime.distributed import DistEnv, broadcast_from_main


def device_name(env: DistEnv) -> str:
    if env.device.type == "cuda":
        return torch.cuda.get_device_name(env.device)
    import platform

    return f"cpu {platform.machine()} x{os.cpu_count()} threads={torch.get_num_threads()}"


def cache_dir() -> Path:
    root = os.environ.get("DIST_GPT_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "dist_gpt") / "autotune"


def cache_key(config: Config, env: DistEnv, strategy_name: str, budget_bytes: float, headroom: float, objective: str, global_batch: int, steps: int) -> dict:
    """Everything the answer depends on. The model's values matter only through its shape, which is all of GPTConfig."""
    from dist_gpt import __version__

    mem_strategy, offload = memory_strategy(config, strategy_name)
    return {
        "model": dataclasses.asdict(config.model.gpt_config()),
        "strategy": strategy_name,
        "memory_strategy": mem_strategy,
        "offload": offload,
        "activation_checkpointing": config.parallel.activation_checkpointing,
        "world_size": env.world_size,
        "device": device_name(env),
        "dtype": str(env.compute_dtype),
        "budget_bytes": int(budget_bytes),
        "headroom": headroom,
        "objective": objective,
        "global_batch": global_batch,
        "trial_steps": steps,
        "torch": torch.__version__,
        "dist_gpt": __version__,
    }


def cache_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / f"{digest}.json"


def outcome_to_json(outcome: Outcome) -> dict:
    return dataclasses.asdict(outcome)


def outcome_from_json(data: dict) -> Outcome:
    tried = [Tried(**{**row, "result": TrialResult(**row["result"])}) for row in data["tried"]]
    return Outcome(**{**data, "tried": tried})


def read_cache(path: Path, env: DistEnv) -> dict | None:
    """Rank 0 reads the cache and tells the others, so all ranks take the same path (search or not)."""
    data = None
    if env.is_main and path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            data = None  # unreadable: search again and overwrite it
    return broadcast_from_main(data)
