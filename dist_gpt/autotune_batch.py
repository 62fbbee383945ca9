"""Micro-batch autotuner: the largest micro-batch that fits the device's memory, measured, not guessed.

    python -m dist_gpt.autotune_batch --config bible-seed [--strategy single|ddp|fsdp|deepspeed]
        [--memory-budget-gb 24] [--headroom 0.08] [--objective largest|throughput] [--no-cache] [section.key=value ...]
    torchrun --nproc_per_node=8 -m dist_gpt.autotune_batch --config gpt2-124m-owt --strategy fsdp

and `train.micro_batch_size: auto` in a training config (the trainer calls `autotune_for_training`).

How it decides. The memory model (dist_gpt.memory) predicts a starting size; from there a search runs *real*
training steps (forward, backward, AdamW step; `TRIAL_STEPS` of them, the real model and strategy on the
real device, random tokens) at candidate sizes, doubling while they fit and then narrowing the bracket
(interpolating on the measured peaks, bisecting when that stalls). A size fits iff no rank ran out of memory
and the highest rank's measured peak is at most budget x (1 - headroom). The peak is
- CUDA: torch.cuda.max_memory_allocated of the trial (reset before it) + the process's fixed overhead (CUDA
  context and other processes on the card: total - free - reserved, measured before the trials); a budget
  below the card is enforced with set_per_process_memory_fraction, so it runs out where a card of that size would;
- CPU: the trial process's peak resident set (VmHWM; the malloc tuning of dist_gpt.runtime applied, as in
  training). Peaks cannot be reset in a process, so every CPU trial runs in a fresh subprocess. CPU has no
  out-of-memory of its own (the kernel would swap or kill), so the limit alone decides; as safety nets a
  trial whose predicted peak exceeds the RAM left is not run, and a trial's heap is capped (RLIMIT_DATA,
  2 x the budget; DIST_GPT_TRIAL_DATA_LIMIT_MB to set it) so that running past it is an out-of-memory.
A trial does as many micro-batches per optimizer step as training will (2 at most: from the second on the
previous gradients are alive during forward, and nothing changes after that).

Out-of-memory policy: an OOM is retried once, after a full cleanup; a size that runs out twice in a row does
not fit. A single OOM can come from outside the step (memory a previous trial had not yet returned, another
process's transient use, fragmentation) and would otherwise make the tuner settle far below what fits; a
second one is real. Once one has repeated, the card is known to run out below the limit (the caching
allocator's reserve exceeds what is allocated), and later OOMs in the search are taken at their word.
A peak over the limit without OOM is not retried: it repeats to within a few percent (on CPU, see
dist_gpt.memory on the heap; rare outliers reach +5-15%), which the headroom absorbs.

Several ranks (torchrun): every rank runs every trial, each in its own subprocess joined in a process group
of its own, so a rank that runs out mid-collective can never leave the training process group out of step;
a rank whose trial runs out (or fails) counts it in a store that every rank's tuner watches, and the other
trials, stuck in a collective with a rank that is gone (or failing because of it), are stopped and count as
out of memory too. The ranks then all_reduce(MAX) the outcome (OOM flag, peak, slowest step) so all agree.

The choice keeps the optimization unchanged: grad-accum = global batch / (micro-batch x world), so the
micro-batch must divide global batch / world; the largest fitting one that does is taken (and said so).
`--objective throughput` measures tokens/s at the largest few valid sizes (and with activation
checkpointing, when that lets a larger size fit) and takes the fastest.

Results are cached per (model shape, strategy, world size, device, budget, headroom, dtype, global batch,
objective) in $DIST_GPT_CACHE/autotune/ (default ~/.cache/dist_gpt/autotune/): a second run reads the answer.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import hashlib
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from dist_gpt import memory
from dist_gpt.config import Config, load_config
from dist_gpt.distributed import DistEnv
from dist_gpt.errors import UserError, cli

TRIAL_STEPS = 3  # optimizer steps per trial: AdamW's moments appear in step 1, so step 2 is the steady state
MAX_TRIALS = 16  # per search; a good start needs 3-5
NO_GLOBAL_BATCH_CAP = 1 << 16  # largest micro-batch tried when the global batch does not bound it
THROUGHPUT_CANDIDATES = 3  # valid sizes (from the largest down) whose speed --objective throughput compares
TRIAL_TIMEOUT_S = 900  # a trial that takes longer is killed (and the tuning stops with the reason)
PEER_FAILURE_GRACE_S = 10  # after a peer's trial failed, how long ours may still finish on its own
# A CPU trial process may not grow its heap past this (RLIMIT_DATA), so a size far past the budget fails
# as out of memory instead of swapping the machine: DIST_GPT_TRIAL_DATA_LIMIT_MB, else this x the budget.
TRIAL_DATA_LIMIT_ENV = "DIST_GPT_TRIAL_DATA_LIMIT_MB"
TRIAL_DATA_LIMIT_X_BUDGET = 2.0
MB, GB = memory.MB, memory.GB


# ================================================================================== the search (pure)


@dataclass
class TrialResult:
    """One measured trial as every rank agrees on it."""

    micro_batch: int
    peak_bytes: int = 0  # what counts against the budget: process overhead + the step's peak (0 after OOM)
    oom: bool = False
    tokens_per_s: float = 0.0  # over all ranks, from the timed steps (after the first)
    failed: bool = False  # not an OOM: a bug or a crash; the tuning stops
    skipped: bool = False  # not run: predicted too far past the RAM (counts as not fitting)
    note: str = ""

    def as_vector(self) -> list[float]:
        """The numbers ranks reduce with MAX (speed negated: the slowest rank sets the pace)."""
        return [float(self.oom), float(self.peak_bytes), -float(self.tokens_per_s), float(self.failed), float(self.skipped)]

    @classmethod
    def from_vector(cls, micro_batch: int, v: Sequence[float], note: str = "") -> TrialResult:
        oom, peak, neg_speed, failed, skipped = v
        return cls(micro_batch, int(peak), bool(oom), -float(neg_speed), bool(failed), bool(skipped), note)


def worst_of(results: Sequence[TrialResult]) -> TrialResult:
    """What the ranks agree on: OOM if any rank ran out, the highest peak, the slowest speed. The same
    element-wise MAX that `agree_across_ranks` does with all_reduce."""
    vectors = [r.as_vector() for r in results]
    notes = "; ".join(sorted({r.note for r in results if r.note}))
    return TrialResult.from_vector(results[0].micro_batch, [max(col) for col in zip(*vectors)], notes)


@dataclass
class Tried:
    """A row of the table: one size, as measured (after a retry if it ran out once)."""

    micro_batch: int
    result: TrialResult
    fits: bool
    predicted_bytes: float = 0.0
    checkpointing: bool = False
    retried: bool = False

    @property
    def outcome(self) -> str:
        if self.result.skipped:
            return "not run"
        if self.result.oom:
            return "OOM (twice)" if self.retried else "OOM"
        over = "fit" if self.fits else "over limit"
        return f"{over} (OOM once, then ran)" if self.retried else over


@dataclass
class Search:
    largest: int  # the largest size that fit (0: none, not even 1)
    tried: list[Tried]


def search_largest(
    trial: Callable[[int], TrialResult],
    limit_bytes: float,
    start: int,
    max_micro_batch: int,
    predict_bytes: Callable[[int], float] | None = None,
    max_trials: int = MAX_TRIALS,
    checkpointing: bool = False,
) -> Search:
    """The largest micro-batch in [1, max_micro_batch] whose trial fits under limit_bytes, found with as few
    trials as possible. Keeps a bracket: `lo` fits (0 = nothing fits yet), `hi` does not (max+1 = nothing
    failed yet). Grows by at most doubling, shrinks by at most halving, and in between aims where the line
    through the measured peaks crosses the limit. It bisects instead when `hi` ran out
    of memory (no peak to draw a line to: the card ran out below the limit) and when two aims in a row
    failed to halve the bracket, so the trial count stays logarithmic even if peaks are noisy or not linear."""
    lo, hi = 0, max_micro_batch + 1
    tried: list[Tried] = []
    peaks: dict[int, int] = {}  # size -> measured peak, for the interpolation
    candidate = max(1, min(start, max_micro_batch))
    aimed = False  # whether `candidate` came from the interpolation (else doubling/halving/bisection)
    stalls = 0  # aimed steps in a row that did not halve the bracket
    oom_confirmed = False  # an OOM has repeated: later ones above the largest fit are where the card runs out
    while hi - lo > 1 and len(tried) < max_trials:
        width = hi - lo
        row = _measure(trial, candidate, limit_bytes, retry_oom=not oom_confirmed)
        row.predicted_bytes = predict_bytes(candidate) if predict_bytes else 0.0
        row.checkpointing = checkpointing
        tried.append(row)
        oom_confirmed = oom_confirmed or (row.retried and row.result.oom)
        if not row.result.oom:
            peaks[candidate] = row.result.peak_bytes
        lo, hi = (candidate, hi) if row.fits else (lo, candidate)
        stalls = stalls + 1 if aimed and hi <= max_micro_batch and (hi - lo) * 2 > width else 0
        candidate, aimed = _next_candidate(lo, hi, max_micro_batch, peaks, limit_bytes, predict_bytes, bisect=stalls >= 2)
    return Search(lo, tried)


def _measure(trial: Callable[[int], TrialResult], micro_batch: int, limit_bytes: float, retry_oom: bool = True) -> Tried:
    result = trial(micro_batch)
    retried = retry_oom and result.oom and not result.skipped
    if retried:  # see the module docstring: one retry, then an OOM is real
        result = trial(micro_batch)
    if result.failed:
        # A UserError in the trial (say, FSDP's vocabulary/world check) is the user's to fix; anything else is a bug.
        kind, _, message = result.note.partition(": ")
        if kind == "UserError":
            raise UserError(message)
        raise RuntimeError(f"the trial at micro-batch {micro_batch} failed: {result.note}")
    fits = not result.oom and result.peak_bytes <= limit_bytes
    return Tried(micro_batch, result, fits, retried=retried)


def _next_candidate(lo, hi, max_micro_batch, peaks, limit_bytes, predict_bytes, bisect: bool) -> tuple[int, bool]:
    if hi > max_micro_batch:  # nothing failed yet: aim, but never past doubling (two close peaks on a noisy
        # device can draw an almost flat line that aims far past the budget: on CPU, seconds of swapping)
        floor, ceiling, fallback = lo + 1, min(max_micro_batch, 2 * lo), min(max_micro_batch, 2 * lo)
        line = _nearest_two(peaks, limit_bytes)
    elif lo == 0:  # nothing fit yet: shrink, at most halving
        floor, ceiling, fallback = max(1, hi // 2), hi - 1, max(1, hi // 2)
        line = _nearest_two(peaks, limit_bytes)
    else:  # a bracket: the line through its two ends, if the failing end has a peak (did not run out)
        floor, ceiling, fallback = lo + 1, hi - 1, (lo + hi) // 2
        line = [lo, hi] if hi in peaks else None
    aim = None if bisect or not line else _crossing(line, peaks, limit_bytes, predict_bytes)
    if aim is None:
        return fallback, False
    return int(min(max(math.floor(aim), floor), ceiling)), True


def _nearest_two(peaks: dict[int, int], limit_bytes: float) -> list[int]:
    return sorted(peaks, key=lambda b: abs(peaks[b] - limit_bytes))[:2]


def _crossing(sizes: list[int], peaks: dict[int, int], limit_bytes: float, predict_bytes) -> float | None:
    """The size where the peak reaches the limit: on the line through the measured peaks of two sizes, or
    through one with the memory model's slope."""
    b0 = sizes[0]
    if len(sizes) == 2:
        slope = (peaks[sizes[1]] - peaks[b0]) / (sizes[1] - b0)
    elif predict_bytes is not None:
        slope = (predict_bytes(b0 + max(1, b0)) - predict_bytes(b0)) / max(1, b0)
    else:
        return None
    if slope <= 0:  # noise swamped the difference: no usable line
        return None
    return b0 + (limit_bytes - peaks[b0]) / slope


# ================================================================================== the choice (pure)


@dataclass
class Outcome:
    micro_batch: int
    grad_accum: int
    global_batch: int  # sequences per optimizer step over all ranks
    checkpointing: bool  # activation checkpointing on for the chosen size
    largest: int  # the largest size that fit (may not divide the global batch)
    tried: list[Tried]
    notes: list[str] = field(default_factory=list)


def valid_sizes(largest: int, global_batch: int, world_size: int) -> list[int]:
    """Sizes <= largest that keep the global batch exact (all of them when it is free), largest first."""
    if global_batch == 0:
        return list(range(largest, 0, -1))
    per_rank = global_batch // world_size
    return [b for b in range(largest, 0, -1) if per_rank % b == 0]


def tune(
    trial: Callable[[int, bool], TrialResult],
    *,
    limit_bytes: float,
    start: int,
    global_batch: int = 0,
    world_size: int = 1,
    objective: str = "largest",
    checkpointing: bool = False,
    checkpointing_start: int | None = None,
    predict_bytes: Callable[[int, bool], float] | None = None,
    nothing_fits: Callable[[Search], str] | None = None,
) -> Outcome:
    """Search, then choose. trial(micro_batch, checkpointing) runs (or simulates) one trial.

    global_batch 0 = free (global = micro-batch x world, grad-accum 1). checkpointing: the configured
    activation-checkpointing setting. checkpointing_start: with objective 'throughput', also search with
    checkpointing on from this size (the caller passes it when the model says that fits more). nothing_fits
    builds the UserError's message when not even micro-batch 1 fits."""
    if objective not in ("largest", "throughput"):
        raise UserError(f"objective {objective!r} is unknown: use largest or throughput")
    if global_batch and global_batch % world_size:
        raise UserError(f"train.global_batch_size={global_batch} is not divisible by the world size {world_size}: make it a multiple of {world_size}")
    cap = global_batch // world_size if global_batch else NO_GLOBAL_BATCH_CAP

    def searched(ac: bool, from_size: int) -> Search:
        predict = (lambda b: predict_bytes(b, ac)) if predict_bytes else None
        return search_largest(lambda b: trial(b, ac), limit_bytes, from_size, cap, predict, checkpointing=ac)

    search = searched(checkpointing, start)
    if search.largest == 0:
        raise UserError(nothing_fits(search) if nothing_fits else f"not even micro-batch 1 fits under {limit_bytes / GB:.2f} GB")
    tried = list(search.tried)
    notes: list[str] = []

    def measured(b: int, ac: bool) -> Tried:
        """The row for size b (measuring it if the search skipped it: the choice is always measured)."""
        for row in tried:
            if row.micro_batch == b and row.checkpointing == ac:
                return row
        row = _measure(lambda size: trial(size, ac), b, limit_bytes)
        row.predicted_bytes = predict_bytes(b, ac) if predict_bytes else 0.0
        row.checkpointing = ac
        tried.append(row)
        return row

    def fitting_valid(largest: int, ac: bool, how_many: int) -> list[Tried]:
        """The largest valid size that fits, measured, and (how_many > 1) smaller ones spread out: each at
        most 3/4 of the previous, so the speeds compared differ by more than noise."""
        rows = []
        for b in valid_sizes(largest, global_batch, world_size):
            if rows and b > 0.75 * rows[-1].micro_batch:
                continue
            row = measured(b, ac)
            if row.fits:  # a size below one that fit can still fail if the device is not monotone: skip it
                rows.append(row)
            if len(rows) == how_many:
                break
        return rows

    how_many = THROUGHPUT_CANDIDATES if objective == "throughput" else 1
    candidates = fitting_valid(search.largest, checkpointing, how_many)
    if objective == "throughput" and not checkpointing and checkpointing_start:
        ac_search = searched(True, checkpointing_start)
        tried.extend(ac_search.tried)
        if ac_search.largest > search.largest:
            candidates += [r for r in fitting_valid(ac_search.largest, True, how_many) if r.micro_batch > search.largest]
        else:
            notes.append(f"activation checkpointing fit no larger a micro-batch ({ac_search.largest})")
    if not candidates:
        raise UserError(f"no micro-batch up to {search.largest} divides train.global_batch_size={global_batch} / world {world_size} and fits: change the global batch")
    best = max(candidates, key=lambda r: r.result.tokens_per_s) if objective == "throughput" else candidates[0]

    per_rank = global_batch // world_size if global_batch else best.micro_batch
    if best.micro_batch < search.largest and objective == "largest":
        suggestion = search.largest * world_size * max(1, round(global_batch / (search.largest * world_size)))
        notes.append(
            f"the largest fitting micro-batch {search.largest} does not divide global batch {global_batch} / world {world_size}; "
            f"using {best.micro_batch}, the largest that does (or set train.global_batch_size={suggestion} to use {search.largest})"
        )
    if objective == "throughput":
        speeds = ", ".join(f"{r.micro_batch}{' (ckpt)' if r.checkpointing else ''}: {r.result.tokens_per_s:,.0f} tok/s" for r in candidates)
        notes.append(f"the fastest of {speeds}")
    return Outcome(
        micro_batch=best.micro_batch,
        grad_accum=per_rank // best.micro_batch,
        global_batch=per_rank * world_size,
        checkpointing=best.checkpointing,
        largest=search.largest,
        tried=tried,
        notes=notes,
    )


# ================================================================================== running one trial


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
        if "can't allocate memory" not in str(e) and "DefaultCPUAllocator" not in str(e):
            raise
        oom = True
    except MemoryError:
        oom = True
    gc.collect()
    if env.device.type == "cuda":
        torch.cuda.empty_cache()
    return oom, speed


def _timed_steps(config: Config, env: DistEnv, micro_batch: int, micro_steps: int, steps: int) -> float:
    from dist_gpt.model import GPT
    from dist_gpt.parallel import build_strategy
    from dist_gpt.trainer import make_optimizer_factory

    strategy = build_strategy(config, env)
    strategy.configure_batch(micro_batch, micro_steps)
    torch.manual_seed(config.train.seed)
    # Random weights of the configured shape: memory and speed depend on the shapes, not on the values.
    strategy.wrap(GPT(config.model.gpt_config()), make_optimizer_factory(config, env.device))
    shape = (micro_batch, config.model.block_size)
    x = torch.randint(config.model.tokenizer_vocab_size, shape, device=env.device)
    y = torch.randint(config.model.tokenizer_vocab_size, shape, device=env.device)
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        for micro_step in range(micro_steps):
            strategy.forward_backward(x, y, 1.0 / micro_steps, sync_grads=micro_step == micro_steps - 1)
        strategy.clip_and_step(config.train.grad_clip)  # returns a float: the device has finished
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


class TrialRunner:
    """trial(micro_batch, checkpointing) -> TrialResult on the real device, agreed by all ranks.

    In this process on a single CUDA device (fast; OOMs are caught and cleaned up), otherwise in a fresh
    subprocess per trial: on CPU because a resident-set peak cannot be reset, with several ranks so that
    a rank running out inside a collective cannot desynchronise the training process group, and for
    DeepSpeed, whose engine keeps process-wide state."""

    def __init__(self, config: Config, env: DistEnv, strategy_name: str, budget_bytes: float, global_batch: int, steps: int = TRIAL_STEPS):
        self.config, self.env, self.budget_bytes, self.global_batch, self.steps = config, env, budget_bytes, global_batch, steps
        self.in_process = env.device.type == "cuda" and env.world_size == 1 and strategy_name != "deepspeed"
        self.overhead_bytes = 0  # measured: CUDA context (+ other processes), or the idle CPU process
        self.count = 0
        self.seconds = 0.0
        self.store = self._trial_store() if not self.in_process and env.world_size > 1 else None
        self.ds_config_file = self._trial_ds_config() if strategy_name == "deepspeed" else None
        self.last_ratio = 1.0  # measured / predicted at the latest trial: guards CPU trials against swapping
        self.predict: Callable[[int, bool], float] | None = None
        self.log: Callable[[str], None] | None = None  # a line per trial as it ends (rank 0 prints them)
        if env.device.type == "cuda":
            self.overhead_bytes = cuda_overhead_bytes(env.device)

    def micro_steps(self, micro_batch: int) -> int:
        """As many micro-steps per optimizer step as training will do, but 2 at most: from the second on,
        the previous micro-batches' gradients are alive during forward, and nothing changes after that."""
        return 2 if self.global_batch > micro_batch * self.env.world_size else 1

    def __call__(self, micro_batch: int, checkpointing: bool = False) -> TrialResult:
        start = time.perf_counter()
        config = trial_config(self.config, checkpointing)
        if self.ds_config_file:
            config = dataclasses.replace(config, parallel=dataclasses.replace(config.parallel, ds_config=self.ds_config_file))
        skip = self._too_big_for_ram(micro_batch, checkpointing)
        if max_over_ranks([skip is not None], self.env)[0]:  # a trial needs every rank: all skip if one must
            result = skip or TrialResult(micro_batch, oom=True, skipped=True, note="not run: past another rank's RAM")
        elif self.in_process:
            result = self._in_process(config, micro_batch)
        else:
            result = self._in_subprocess(config, micro_batch)
        result = agree_across_ranks(result, self.env)
        if self.predict and result.peak_bytes:
            self.last_ratio = result.peak_bytes / self.predict(micro_batch, checkpointing)
        self.count += 1
        self.seconds += time.perf_counter() - start
        if self.log:
            measured = "out of memory" if result.oom else f"{result.peak_bytes / MB:,.0f} MB, {result.tokens_per_s:,.0f} tokens/s"
            self.log(f"  trial {self.count}: micro-batch {micro_batch}{' (checkpointing)' if checkpointing else ''}: {measured} "
                     f"({time.perf_counter() - start:.1f} s){' [' + result.note + ']' if result.note else ''}")
        return result

    # ---------------------------------------------------------------- CUDA, in this process

    def _in_process(self, config: Config, micro_batch: int) -> TrialResult:
        device = self.env.device
        total = torch.cuda.get_device_properties(device).total_memory
        # Emulate a card of budget_bytes: the allocator may reserve the budget less what it cannot use anyway.
        fraction = min(1.0, max(0.0, self.budget_bytes - self.overhead_bytes) / total)
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the strategies' notices, once per trial: noise here
                oom, speed = run_steps(config, self.env, micro_batch, self.micro_steps(micro_batch), self.steps)
            peak = torch.cuda.max_memory_allocated(device)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, device)  # training itself runs unconstrained
        return TrialResult(micro_batch, 0 if oom else peak + self.overhead_bytes, oom, speed)

    # ---------------------------------------------------------------- a subprocess per trial

    def _too_big_for_ram(self, micro_batch: int, checkpointing: bool) -> TrialResult | None:
        """On CPU, a trial far past the RAM would swap or meet the OOM killer (on a shared machine, maybe
        not ours): skip it when the model, scaled by the last measurement, says it would not fit in RAM."""
        if self.env.device.type != "cpu" or self.predict is None:
            return None
        import psutil

        expected = self.predict(micro_batch, checkpointing) * max(1.0, self.last_ratio)
        room = psutil.virtual_memory().available * 0.9
        if expected <= room:
            return None
        return TrialResult(micro_batch, int(expected), oom=True, skipped=True, note=f"~{expected / GB:.1f} GB predicted, {room / GB:.1f} GB of RAM available")

    def _in_subprocess(self, config: Config, micro_batch: int) -> TrialResult:
        env = self.env
        with tempfile.TemporaryDirectory(prefix="dist_gpt_trial_") as tmp:
            spec = {
                "config": config.to_dict(),
                "micro_batch": micro_batch,
                "micro_steps": self.micro_steps(micro_batch),
                "steps": self.steps,
                "budget_bytes": self.budget_bytes,
                "rank": env.rank,
                "local_rank": env.local_rank,
                "world_size": env.world_size,
                "device": str(env.device),
                "dtype": {torch.bfloat16: "bf16", torch.float32: "fp32"}[env.compute_dtype],
                "store": [self.store_host, self.store.port, f"trial{self.count}"] if self.store else None,
                "data_limit_bytes": self._data_limit_bytes(),
                "result": str(Path(tmp) / "result.json"),
            }
            spec_path = Path(tmp) / "spec.json"
            spec_path.write_text(json.dumps(spec))
            log_path = Path(tmp) / "log.txt"
            with open(log_path, "w") as log:
                proc = subprocess.Popen([sys.executable, "-m", "dist_gpt.autotune_batch", "--trial", str(spec_path)], stdout=log, stderr=subprocess.STDOUT)
                ending = self._wait(proc, spec["store"][2] if self.store else None)
            result_path = Path(spec["result"])
            if result_path.exists():
                data = json.loads(result_path.read_text())
                if env.device.type == "cpu":
                    self.overhead_bytes = data["overhead_bytes"]
                result = TrialResult(**data["result"])
            elif ending == "timed out":
                result = TrialResult(micro_batch, failed=True, note=f"TimeoutError: the trial took over {TRIAL_TIMEOUT_S} s")
            elif ending == "peer failed":  # told apart below: a peer that ran out, or one that failed
                result = TrialResult(micro_batch, failed=True, note="stopped: another rank's trial failed")
            elif proc.returncode in (-6, -9) and spec["data_limit_bytes"]:  # an allocation past RLIMIT_DATA that aborted
                result = TrialResult(micro_batch, oom=True, note=f"killed by signal {-proc.returncode} at the heap cap")
            elif proc.returncode == -9:  # a SIGKILL that we did not send: the kernel's OOM killer
                result = TrialResult(micro_batch, oom=True, note="killed (the kernel's OOM killer?)")
            else:
                tail = log_path.read_text()[-2000:].strip().splitlines()
                result = TrialResult(micro_batch, failed=True, note=f"trial process exited with {proc.returncode}: {tail[-1] if tail else ''}")
        if result.failed and self._peer_ran_out(spec["store"]):
            # Ours was stuck in (or broken by) a collective with a rank that ran out: it did not fit either.
            return TrialResult(micro_batch, oom=True, note="stopped: another rank ran out of memory")
        return result

    def _data_limit_bytes(self) -> int | None:
        if self.env.device.type != "cpu":
            return None
        if os.environ.get(TRIAL_DATA_LIMIT_ENV):
            return int(float(os.environ[TRIAL_DATA_LIMIT_ENV]) * MB)
        return int(TRIAL_DATA_LIMIT_X_BUDGET * self.budget_bytes) if math.isfinite(self.budget_bytes) else None

    def _peer_ran_out(self, store_spec) -> bool:
        """Whether another rank's trial reported running out (ours failed, so the count is not ours)."""
        return bool(store_spec) and self.store.add(f"{store_spec[2]}/oom", 0) > 0

    def _wait(self, proc: subprocess.Popen, prefix: str | None) -> str:
        """Wait for the trial: 'exited', or 'peer failed' / 'timed out' when we had to kill it (a peer's
        trial failed, so ours would wait in a collective until the group's timeout)."""
        deadline = time.monotonic() + TRIAL_TIMEOUT_S
        peer_failed_at = None
        while True:
            try:
                proc.wait(timeout=0.5)
                return "exited"
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if prefix and peer_failed_at is None and self.store.add(f"{prefix}/oom", 0) + self.store.add(f"{prefix}/failed", 0) > 0:
                peer_failed_at = now
            if now > deadline or (peer_failed_at is not None and now - peer_failed_at > PEER_FAILURE_GRACE_S):
                proc.kill()
                proc.wait()
                return "peer failed" if peer_failed_at is not None else "timed out"

    def _trial_store(self):
        """A TCPStore hosted by rank 0's tuner: the trials' process groups meet there, and a failing trial
        raises a flag in it that every rank's tuner watches."""
        import torch.distributed as dist

        self.store_host = os.environ.get("MASTER_ADDR", "127.0.0.1")
        port = [None]
        if self.env.rank == 0:
            store = dist.TCPStore(self.store_host, 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=60))
            port = [store.port]
        dist.broadcast_object_list(port, src=0)
        if self.env.rank != 0:
            store = dist.TCPStore(self.store_host, port[0], is_master=False, timeout=datetime.timedelta(seconds=60))
        return store

    def _trial_ds_config(self) -> str:
        """The run's DeepSpeed JSON with the batch keys left to each trial ("auto"): a trial's size is its own."""
        from dist_gpt.parallel.deepspeed import load_ds_config

        ds = load_ds_config(self.config.parallel.ds_config)
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
            ds[key] = "auto"
        handle, path = tempfile.mkstemp(prefix="dist_gpt_trial_ds_", suffix=".json")
        with os.fdopen(handle, "w") as f:
            json.dump(ds, f)
        return path


def max_over_ranks(values: Sequence[float], env: DistEnv) -> list[float]:
    """Element-wise all_reduce(MAX) over the ranks; the values themselves on a world of one."""
    from dist_gpt.distributed import all_reduce_max

    return list(values) if env.world_size == 1 else all_reduce_max(values)


def agree_across_ranks(result: TrialResult, env: DistEnv) -> TrialResult:
    """all_reduce(MAX) of (OOM, peak, -speed, failed, skipped): every rank gets the worst rank's outcome.
    Every rank reaches this call whether its trial ran, ran out or failed, so no rank is left waiting."""
    vector = max_over_ranks(result.as_vector(), env)
    agreed = TrialResult.from_vector(result.micro_batch, vector, result.note)
    if (agreed.oom and not result.oom) or (agreed.failed and not result.failed):
        agreed.note = "on another rank"
    return agreed


def trial_main(spec_path: str) -> None:
    """The subprocess side of a trial: run it, write the result, exit without waiting on peers."""
    spec = json.loads(Path(spec_path).read_text())
    device = torch.device(spec["device"])
    if device.type == "cpu":
        from dist_gpt.runtime import keep_freed_memory

        keep_freed_memory()  # as the trainer does on CPU: the heap behaves as it will in training
    from dist_gpt.config import from_dict
    import dist_gpt.parallel, dist_gpt.trainer  # noqa: F401  (imported before the idle resident set is read)

    config = from_dict(spec["config"])
    env = DistEnv(rank=spec["rank"], local_rank=spec["local_rank"], world_size=spec["world_size"], device=device,
                  compute_dtype=torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the process group: NCCL binds to the current device
    store = _join_trial_group(spec, env) if spec["store"] else None
    if device.type == "cuda":
        overhead = cuda_overhead_bytes(device)
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, max(0.0, spec["budget_bytes"] - overhead) / total), device)
    else:
        overhead = resident_bytes()  # python + torch + dist_gpt imported, nothing computed: the idle process
        if spec["data_limit_bytes"]:
            import resource

            resource.setrlimit(resource.RLIMIT_DATA, (spec["data_limit_bytes"], spec["data_limit_bytes"]))
    result = TrialResult(spec["micro_batch"])
    try:
        result.oom, result.tokens_per_s = run_steps(config, env, spec["micro_batch"], spec["micro_steps"], spec["steps"])
    except Exception as e:  # a bug, not a size: reported, and the tuning stops
        result.failed, result.note = True, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if not (result.oom or result.failed):
        result.peak_bytes = torch.cuda.max_memory_allocated(device) + overhead if device.type == "cuda" else memory.peak_resident_bytes()
    if store is not None and (result.oom or result.failed):
        store.add(f"{spec['store'][2]}/{'oom' if result.oom else 'failed'}", 1)  # the other ranks' tuners watch these
    Path(spec["result"]).write_text(json.dumps({"result": dataclasses.asdict(result), "overhead_bytes": overhead}))
    sys.stdout.flush()
    os._exit(0)  # no process-group teardown: a peer that ran out may never answer


def _join_trial_group(spec: dict, env: DistEnv):
    import torch.distributed as dist

    host, port, prefix = spec["store"]
    store = dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=60))
    backend = spec["config"]["parallel"]["backend"]
    if backend == "auto":
        backend = "nccl" if env.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.PrefixStore(prefix, store), rank=env.rank, world_size=env.world_size,
                            timeout=datetime.timedelta(seconds=TRIAL_TIMEOUT_S))
    return store


# ================================================================================== budget, model, cache


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


# ================================================================================== the whole tuning


@dataclass
class Report:
    outcome: Outcome
    header: str
    strategy_name: str
    from_cache: Path | None = None
    trials: int = 0
    seconds: float = 0.0

    def render(self) -> str:
        o = self.outcome
        lines = [self.header, "  micro-batch  ckpt  predicted MB  measured MB      tokens/s  result"]
        for row in o.tried:
            measured = f"{row.result.peak_bytes / MB:,.0f}" if row.result.peak_bytes and not row.result.oom else "-"
            speed = f"{row.result.tokens_per_s:,.0f}" if row.result.tokens_per_s else "-"
            note = f" [{row.result.note}]" if row.result.note else ""
            lines.append(f"  {row.micro_batch:>11}  {'yes' if row.checkpointing else 'no':>4}  {row.predicted_bytes / MB:>12,.0f}  {measured:>11}  {speed:>12}  {row.outcome}{note}")
        lines.append(f"choice: micro-batch {o.micro_batch} x grad-accum {o.grad_accum} x world {o.global_batch // (o.micro_batch * o.grad_accum)} = global batch {o.global_batch}"
                     + (" with activation checkpointing" if o.checkpointing else ""))
        lines += [f"  note: {n}" for n in o.notes]
        fragment = f"train.micro_batch_size={o.micro_batch} train.global_batch_size={o.global_batch}" + (" parallel.activation_checkpointing=true" if o.checkpointing else "")
        lines.append(f"reuse: {fragment}")
        if self.strategy_name == "deepspeed":
            ds = {"train_micro_batch_size_per_gpu": o.micro_batch, "gradient_accumulation_steps": o.grad_accum, "train_batch_size": o.global_batch}
            lines.append(f"deepspeed json: {json.dumps(ds)}")
        if self.from_cache:
            lines.append(f"used the cached result {self.from_cache} (no trials run; --no-cache or delete it to search again)")
        else:
            lines.append(f"searched in {self.trials} trials, {self.seconds:.1f} s")
        return "\n".join(lines)


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
    global_batch = config.train.global_batch_size or _ds_global_batch(config, strategy_name)
    key = cache_key(config, env, strategy_name, budget, headroom, objective, global_batch, steps)
    path = cache_path(key)
    header = (f"autotune: {config.name} | {strategy_name} on {env.world_size} x {device_name(env)} | {env.compute_dtype} | "
              f"budget {budget / GB:.2f} GB - {headroom:.0%} headroom = limit {limit / GB:.2f} GB per rank")

    cached = _read_cache(path, env) if use_cache else None
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
    return Report(outcome, header, strategy_name, trials=runner.count, seconds=runner.seconds)


def _ds_global_batch(config: Config, strategy_name: str) -> int:
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


def _read_cache(path: Path, env: DistEnv) -> dict | None:
    """Rank 0 reads the cache and tells the others, so all ranks take the same path (search or not)."""
    data = None
    if env.is_main and path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            data = None  # unreadable: search again and overwrite it
    import torch.distributed as dist

    if env.world_size > 1 and dist.is_initialized():
        box = [data]
        dist.broadcast_object_list(box, src=0)
        data = box[0]
    return data


class RunMemoryModel:
    """dist_gpt.memory set up for this run: its shape, strategy, world, dtype and device, and the overhead
    the trials measured (CUDA context, idle CPU process) once they have."""

    def __init__(self, config: Config, env: DistEnv, strategy_name: str, runner: TrialRunner):
        self.shape = config.model.gpt_config()
        self.strategy, self.offload = memory_strategy(config, strategy_name)
        self.world_size, self.device = env.world_size, env.device.type
        self.dtype = "bf16" if env.compute_dtype == torch.bfloat16 else "fp32"
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


# ================================================================================== entry points


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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dist_gpt.autotune_batch", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="bible-tiny", help="a preset name (dist_gpt/configs) or a YAML file")
    parser.add_argument("--strategy", choices=("auto", "single", "ddp", "fsdp", "deepspeed"), help="parallel.strategy (default: the config's)")
    parser.add_argument("--ds_config", "--deepspeed_config", default="", help="DeepSpeed JSON (with --strategy deepspeed)")
    parser.add_argument("--memory-budget-gb", type=float, default=0.0, help="memory per rank to fill (default: the whole GPU; on CPU the available RAM)")
    parser.add_argument("--headroom", type=float, default=0.08, help="fraction of the budget kept free (default 0.08)")
    parser.add_argument("--objective", choices=("largest", "throughput"), default="largest")
    parser.add_argument("--trial-steps", type=int, default=TRIAL_STEPS, help=f"optimizer steps per trial (default {TRIAL_STEPS}, at least 2)")
    parser.add_argument("--no-cache", action="store_true", help="search even if a cached result exists (and replace it)")
    parser.add_argument("--trial", help=argparse.SUPPRESS)  # internal: run one trial described by this JSON spec
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.block_size=512 train.global_batch_size=64")
    return parser.parse_args(argv)


@cli
def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.trial:
        trial_main(args.trial)
        return
    if args.trial_steps < 2:
        raise UserError(f"--trial-steps={args.trial_steps} must be at least 2: the first step has no optimizer state yet")
    overrides = list(args.overrides)
    if args.strategy:
        overrides.append(f"parallel.strategy={args.strategy}")
    if args.ds_config:
        overrides.append(f"parallel.ds_config={args.ds_config}")
    config = load_config(args.config, overrides)
    from dist_gpt.distributed import destroy_distributed, init_distributed
    from dist_gpt.parallel import resolve_strategy_name

    env = init_distributed(config.train.device, config.train.dtype, config.parallel.backend)
    try:
        report = autotune(config, env, resolve_strategy_name(config, env), budget_bytes=args.memory_budget_gb * GB or None,
                          headroom=args.headroom, objective=args.objective, use_cache=not args.no_cache, steps=args.trial_steps,
                          log=say if env.is_main else None)
        if env.is_main:
            say(report.render())
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
