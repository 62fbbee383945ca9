"""One optimizer step, the same for the trainer, the bench and the autotuner's trials.

    accumulate_gradients   grad_accum micro-batches: forward + backward of loss / grad_accum each, gradients
                           synchronised over ranks only on the last one
    apply_update           clip the global gradient norm, step the optimizer, zero the gradients

`train_step` is the two in a row; the bench calls them apart to time each. Anything that changes how a
step treats its gradients (skipping a step whose gradients are not finite) belongs here, once, and
`StepResult` is where it reports back.

A step whose global gradient norm is not finite is skipped (the strategy's clip_and_step applies nothing and
drops the gradients). Every rank decides from that same number, which clipping computes anyway (after the
gradient all-reduce / reduce-scatter, or inside DeepSpeed's step): all ranks skip together, with no extra
communication. A non-finite loss on any rank back-propagates into non-finite gradients on that rank, which the
reduction carries into the norm: the norm answers for the loss too.

fp16's loss scaling lives one floor down, in the strategy (`Strategy.scaler`, or DeepSpeed's engine): it wraps
the strategy's own backward (scale) and optimizer step (unscale, clip, skip on overflow). Its skips are expected
while the scale settles (FP16_OVERFLOW, not counted as divergence) until the scale falls to MIN_LOSS_SCALE:
gradients that overflow even then are NON_FINITE like any other.

Host synchronisation: none per micro-batch (the loss is summed on the device); one per step, when the norm is
read here to decide and report the skip. It leaves the GPU idle between the end of one step and the first
kernels of the next (the host's launch latency, well under 1 % of gpt2-124m-owt's ~1 s steps of 40 micro-
batches; more for steps of one small micro-batch). With fp16 on CUDA the overflow check itself stays on the
device (the fused AdamW takes the scaler's flag); the read here is still the step's one sync.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from dist_gpt.parallel import Strategy

NextBatch = Callable[[], tuple[torch.Tensor, torch.Tensor]]  # -> (inputs, targets) for one micro-batch
NON_FINITE = "non-finite loss or gradient norm"  # a skip that signals divergence
FP16_OVERFLOW = "fp16 overflow (the loss scale was lowered)"  # a skip the fp16 loss scaler expects


@dataclass
class StepResult:
    loss: torch.Tensor  # this rank's mean loss over the step's micro-batches, still on the device (no sync)
    grad_norm: float  # the global gradient norm before clipping, the same on every rank
    skipped: bool = False  # the optimizer did not apply this step's gradients
    skip_reason: str | None = None  # why (NON_FINITE, ...): dist_gpt.engine.step_guard counts only divergence


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
    grad_norm = float(strategy.clip_and_step(grad_clip))  # skips the update itself when the norm is not finite
    if math.isfinite(grad_norm):
        return StepResult(loss, grad_norm)
    reason = FP16_OVERFLOW if strategy.skipped_for_overflow() else NON_FINITE
    return StepResult(loss, grad_norm, skipped=True, skip_reason=reason)


def train_step(strategy: Strategy, next_batch: NextBatch, grad_accum: int, grad_clip: float) -> StepResult:
    return apply_update(strategy, accumulate_gradients(strategy, next_batch, grad_accum), grad_clip)
