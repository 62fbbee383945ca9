"""Learning rate: linear warmup, then a cosine down to a floor, then the floor."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class CosineSchedule:
    lr: float
    min_lr: float
    warmup_steps: int
    decay_steps: int  # the step at which the cosine reaches min_lr

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps  # never 0: step 0 already learns
        if step >= self.decay_steps:
            return self.min_lr
        progress = (step - self.warmup_steps) / max(1, self.decay_steps - self.warmup_steps)
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (self.lr - self.min_lr)


def schedule_notice(warmup_steps: int, max_steps: int) -> str | None:
    """One line for a run shorter than its warmup (a smoke test of a preset, typically): it never reaches the
    peak lr. Said at the start rather than refused, so `train.max_steps=2` stays a quick check of any preset."""
    if max_steps < warmup_steps:
        return f"note: train.max_steps={max_steps} < train.warmup_steps={warmup_steps}: the run ends during the warmup, at {max_steps / warmup_steps:.0%} of the peak lr"
    return None
