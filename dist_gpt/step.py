"""One optimizer step, the same for the trainer, the bench and the autotuner's trials.

    accumulate_gradients   grad_accum micro-batches: forward + backward of loss / grad_accum each, gradients
                           synchronised over ranks only on the last one
    apply_update           clip the global gradient norm, step the optimizer, zero the gradients

`train_step` is the two in a row; the bench calls them apart to time each. Anything that changes how a
step treats its gradients (loss scaling, skipping a step whose gradients are not finite) belongs here, once,
and `StepResult` is where it reports back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from dist_gpt.parallel import Strategy

NextBatch = Callable[[], tuple[torch.Tensor, torch.Tensor]]  # -> (inputs, targets) for one micro-batch


@dataclass
class StepResult:
    loss: torch.Tensor  # this rank's mean loss over the step's micro-batches, still on the device (no sync)
    grad_norm: float  # the global gradient norm before clipping, the same on every rank
    skipped: bool = False  # the optimizer did not apply this step's gradients


def accumulate_gradients(strategy: Strategy, next_batch: NextBatch, grad_accum: int) -> torch.Tensor:
    """Forward and backward over grad_accum micro-batches; returns their mean loss (a device tensor: reading
    it on the host would wait for the device every micro-batch)."""
    loss_sum = torch.zeros((), device=strategy.env.device)
    for micro_step in range(grad_accum):
        x, y = next_batch()
        loss_sum += strategy.forward_backward(x, y, 1.0 / grad_accum, sync_grads=micro_step == grad_accum - 1)
    return loss_sum / grad_accum


def apply_update(strategy: Strategy, loss: torch.Tensor, grad_clip: float) -> StepResult:
    """Clip (train.grad_clip, 0 = off) and step on the accumulated gradients."""
    grad_norm = strategy.clip_and_step(grad_clip)
    return StepResult(loss, grad_norm)


def train_step(strategy: Strategy, next_batch: NextBatch, grad_accum: int, grad_clip: float) -> StepResult:
    return apply_update(strategy, accumulate_gradients(strategy, next_batch, grad_accum), grad_clip)
