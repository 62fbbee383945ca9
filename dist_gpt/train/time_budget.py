"""train.time_limit: "this machine is mine for 3 h 30 min": save and stop while there is still time to.

At each step boundary the run asks whether one more step, the eval due after it (if any) and a save still fit
before the limit, using the slowest of this run's recent steps and evals and its slowest save (before the
first save: an estimate from the size of the state). When they do not, it saves and exits 0 (the same command
resumes). The clock starts when the training process starts, so imports and start-up count too.
"""

from __future__ import annotations

import collections
import os
import time

import psutil

from dist_gpt.config import parse_time_limit

ENV_VAR = "DIST_GPT_TIME_LIMIT"  # for job scripts: the scheduler's remaining time, e.g. SLURM's 1-02:00:00
RECENT_STEPS = 20  # the window of step times: long enough to see a slow one, short enough to forget start-up
ASSUMED_WRITE_BYTES_PER_S = 100e6  # until a save is measured: a slow network disk
EXIT_SECONDS = 5.0  # after the last save: the summary, leaving the process group, the interpreter's exit

def effective_time_limit(configured: str | float) -> tuple[float | None, str]:
    """(seconds, what set it): the earlier of train.time_limit and $DIST_GPT_TIME_LIMIT, both being deadlines."""
    limits = [(parse_time_limit(configured), f"train.time_limit={configured}"), (parse_time_limit(os.environ.get(ENV_VAR), ENV_VAR), f"{ENV_VAR}={os.environ.get(ENV_VAR)}")]
    given = [(seconds, name) for seconds, name in limits if seconds is not None]
    return min(given) if given else (None, "")


def seconds_left(limit_seconds: float | None) -> float:
    """What remains of the limit for this process (it started the clock), less the exit; inf without a limit."""
    if not limit_seconds:
        return float("inf")
    return max(0.0, limit_seconds - (time.time() - psutil.Process().create_time()) - EXIT_SECONDS)


class TimeBudget:
    """Whether another step (+ eval) + a save still fit before the limit. Timings are recorded as they come."""

    def __init__(self, limit_seconds: float, source: str, state_bytes: int, eval_in_steps: float):
        """state_bytes: what a save writes (for the estimate before one is measured); eval_in_steps: an eval's
        forwards per rank over a step's micro-batches (a forward is cheaper than a step's forward + backward:
        an over-estimate, until an eval is measured)."""
        self.limit, self.source, self.eval_in_steps = limit_seconds, source, eval_in_steps
        self.started = psutil.Process().create_time()  # wall clock: the process's start, not this object's
        self.steps: collections.deque[float] = collections.deque(maxlen=RECENT_STEPS)
        self.eval_seconds = 0.0
        self.estimated_save_seconds = state_bytes / ASSUMED_WRITE_BYTES_PER_S

    def record_step(self, seconds: float) -> None:
        self.steps.append(seconds)

    def record_eval(self, seconds: float) -> None:
        self.eval_seconds = max(self.eval_seconds, seconds)

    def stop_reason(self, eval_due_next: bool, measured_save_seconds: float | None) -> str | None:
        """None while another step still fits; else why the run stops now (for the stop line)."""
        step = max(self.steps, default=0.0)
        evaluation = (self.eval_seconds or step * self.eval_in_steps) if eval_due_next else 0.0
        save = measured_save_seconds if measured_save_seconds is not None else self.estimated_save_seconds
        left = self.limit - (time.time() - self.started)
        if step + evaluation + save + EXIT_SECONDS <= left:
            return None
        needed = f"a step ~{step:.1f} s" + (f", an eval ~{evaluation:.1f} s" if evaluation else "") + f", a save ~{save:.1f} s and the exit"
        return f"{self.source}: {max(left, 0):.0f} s left, too few for {needed}"
