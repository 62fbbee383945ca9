"""The search and the choice, pure functions over a trial callable (tests drive them with simulated devices).

`search_largest` finds the largest micro-batch whose trial fits under a limit in few trials; `tune` searches,
then chooses the size to train with (dividing the global batch; with --objective throughput, the fastest)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

from dist_gpt.autotune.memory import GB
from dist_gpt.errors import UserError

MAX_TRIALS = 16  # per search; a good start needs 3-5
NO_GLOBAL_BATCH_CAP = 1 << 16  # largest micro-batch tried when the global batch does not bound it
THROUGHPUT_CANDIDATES = 3  # valid sizes (from the largest down) whose speed --objective throughput compares


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


# ------------------------------------------------------------------------------------------ the choice


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
