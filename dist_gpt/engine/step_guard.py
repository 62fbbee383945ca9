"""When skipped steps mean the run has diverged: `max_consecutive` non-finite steps in a row (see dist_gpt.engine.step
for how a step is skipped, on every rank alike).

A skipped step still counts as a step: its batch is consumed and the learning-rate schedule moves on, so step
numbers, the data order and the schedule stay functions of the step number alone (a resume needs nothing
more), at the price of one lost update per skip.
"""

from __future__ import annotations

from dist_gpt.engine.step import NON_FINITE, StepResult


class DivergenceGuard:
    """Counts non-finite skips; `diverged` once max_consecutive of them come in a row (0 = never)."""

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total = 0  # in this process

    def record(self, result: StepResult) -> None:
        if result.skip_reason == NON_FINITE:
            self.consecutive += 1
            self.total += 1
        elif not result.skipped:
            self.consecutive = 0  # other skips (fp16 overflow) neither count nor break a run of them

    @property
    def diverged(self) -> bool:
        return bool(self.max_consecutive) and self.consecutive >= self.max_consecutive

    def message(self, step: int, newest_checkpoint: str | None, train, low_precision: bool) -> str:
        """The one line a diverged run ends with: what happened, where, what is kept, what to try."""
        first = step - self.consecutive + 1
        kept = f"the newest good checkpoint is {newest_checkpoint} (the same command resumes from it)" if newest_checkpoint else "no checkpoint was saved before it"
        clip = f"a lower train.grad_clip (now {train.grad_clip:g})" if train.grad_clip else "train.grad_clip=1.0 (now off)"
        tries = [f"a lower train.lr (now {train.lr:g})", clip] + ([f"train.dtype=fp32 (now {train.dtype})"] if low_precision else [])
        return (
            f"the run diverged: steps {first}-{step} ({self.consecutive} in a row, train.max_skipped_steps={self.max_consecutive}) had a {NON_FINITE} "
            f"and were skipped; {kept}; try {', '.join(tries[:-1])} or {tries[-1]}"
        )
