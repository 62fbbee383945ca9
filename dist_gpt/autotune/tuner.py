"""The whole tuning: the budget, the cache, the search over real trials, the record."""

from __future__ import annotations

import json
import os
from typing import Callable, Sequence

from dist_gpt.autotune import memory
from dist_gpt.autotune.budget import RunMemoryModel, default_budget_bytes, ds_global_batch, nothing_fits_message
from dist_gpt.autotune.cache import cache_key, cache_path, device_name, outcome_from_json, outcome_to_json, read_cache
from dist_gpt.autotune.measure import TRIAL_STEPS
from dist_gpt.autotune.memory import GB, MB
from dist_gpt.autotune.report import Report
from dist_gpt.autotune.search import Search, TrialResult, tune
from dist_gpt.autotune.trials import TrialRunner, max_over_ranks
from dist_gpt.config import Config
from dist_gpt.errors import UserError
from dist_gpt.runtime.distributed import DistEnv


def autotune(
    config: Config,
    env: DistEnv,
    strategy_name: str,
    budget_bytes: float | None = None,
    headroom: float = 0.08,
    objective: str = "largest",
    use_cache: bool = True,
    steps: int = TRIAL_STEPS,
    log: Callable[[str], None] | None = None,
) -> Report:
    """Tune the micro-batch for this run (every rank calls it; all get the same answer). `log` gets the
    progress (the header, then a line per trial) while the search runs."""
    if not 0.0 <= headroom < 1.0:
        raise UserError(f"headroom={headroom} must be in [0, 1) (a fraction of the budget kept free, e.g. 0.08)")
    if budget_bytes is not None and budget_bytes <= 0:
        raise UserError(f"the memory budget must be positive, got {budget_bytes / GB:.2f} GB")
    # Every rank must judge fits alike, or their searches diverge: the smallest budget of any rank holds.
    budget = -max_over_ranks([-(budget_bytes or default_budget_bytes(env))], env)[0]
    limit = budget * (1 - headroom)
    global_batch = config.train.global_batch_size or ds_global_batch(config, strategy_name)
    key = cache_key(config, env, strategy_name, budget, headroom, objective, global_batch, steps)
    path = cache_path(key)
    header = (f"autotune: {config.name} | {strategy_name} on {env.world_size} x {device_name(env)} | {env.compute_dtype} | "
              f"budget {budget / MB:,.0f} MB - {headroom:.0%} headroom = limit {limit / MB:,.0f} MB per rank")  # MB throughout, as the table

    cached = read_cache(path, env) if use_cache else None
    if cached is not None:
        return Report(outcome_from_json(cached["outcome"]), header, strategy_name, from_cache=path)

    runner = TrialRunner(config, env, strategy_name, budget, global_batch, steps)
    model = RunMemoryModel(config, env, strategy_name, runner)
    runner.predict, runner.log = model, log
    ac = config.parallel.activation_checkpointing
    start = max(1, model.largest(limit, ac))
    header += f"\nthe memory model predicts micro-batch {start} fits ({model(start, ac) / MB:,.0f} MB); measuring"
    if log:
        log(header)
    ac_start = None
    if objective == "throughput" and not ac:
        ac_largest = model.largest(limit, True)
        ac_start = ac_largest if ac_largest > start * 1.25 else None  # worth a search only if clearly larger

    def nothing_fits(search: Search) -> str:
        return nothing_fits_message(search, limit, budget, headroom, model, config)

    try:
        outcome = tune(runner, limit_bytes=limit, start=start, global_batch=global_batch, world_size=env.world_size, objective=objective,
                       checkpointing=ac, checkpointing_start=ac_start, predict_bytes=model, nothing_fits=nothing_fits)
    finally:
        if runner.ds_config_file:
            os.unlink(runner.ds_config_file)
    if env.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": key, "outcome": outcome_to_json(outcome)}, indent=1))
    return Report(outcome, header, strategy_name, trials=runner.count, seconds=runner.seconds, header_shown=log is not None)


def measure_sizes(config: Config, env: DistEnv, strategy_name: str, sizes: Sequence[int], steps: int = TRIAL_STEPS) -> list[tuple[memory.Breakdown, TrialResult]]:
    """The memory model against measurement: (prediction, trial) at each size, no search, no budget.
    benchmarks/memory_model.py prints these; tests/test_autotune.py holds the model to them."""
    runner = TrialRunner(config, env, strategy_name, budget_bytes=float("inf"), global_batch=config.train.global_batch_size, steps=steps)
    model = runner.predict = RunMemoryModel(config, env, strategy_name, runner)
    ac = config.parallel.activation_checkpointing
    rows = []
    for size in sizes:
        result = runner(size, ac)  # first: on CPU it measures the overhead the prediction then uses
        rows.append((model.breakdown(size, ac), result))
    return rows


def say(line: str) -> None:
    print(line, flush=True)  # progress must show while the search runs, not when a pipe's buffer fills


def autotune_for_training(config: Config, env: DistEnv, strategy_name: str) -> int:
    """`train.micro_batch_size: auto`: tune (or read the cache), print the table on rank 0, record the choice
    in the run directory, and return the micro-batch. The budget is train.memory_budget_gb (0 = the device:
    the whole GPU; on CPU this process's share of the available RAM), the headroom train.memory_headroom."""
    t = config.train
    log = say if env.is_main else None
    report = autotune(config, env, strategy_name, budget_bytes=t.memory_budget_gb * GB or None, headroom=t.memory_headroom, log=log)
    if env.is_main:
        say(report.render())
        config.run_dir.mkdir(parents=True, exist_ok=True)
        (config.run_dir / "autotune.json").write_text(json.dumps(outcome_to_json(report.outcome), indent=1))
    return report.outcome.micro_batch
