"""One device, no communication: the reference every other strategy must match (to 1e-4 in fp32; in bf16 to
bf16's noise, as the precision policy in runtime/precision.py says)."""

from __future__ import annotations

import math

import torch.nn as nn

from dist_gpt.parallel.base import BatchShape, OptimizerFactory, Strategy, clip_grad_norm


class SingleDevice(Strategy):
    """Also the skeleton of DDP and FSDP: they only change `parallelize` and how gradient sync is skipped."""

    name = "single"

    def wrap(self, model: nn.Module, make_optimizer: OptimizerFactory, batch: BatchShape) -> None:
        model = self.prepare_model(model)
        self.model = self.parallelize(model)
        self.optimizer = make_optimizer(model)  # after parallelize: FSDP replaces the parameters with shards

    def parallelize(self, model: nn.Module) -> nn.Module:
        """Return the module that runs forward (a wrapper, or the model itself sharded in place)."""
        return model

    def forward_backward(self, x, y, loss_scale, sync_grads):
        with self.autocast():
            loss = self.model(x, y)
        self.scaler.scale(loss * loss_scale).backward()
        return loss.detach()

    def clip_and_step(self, max_norm: float):
        self.scaler.unscale_(self.optimizer)  # clipping and the reported norm see the true gradients
        norm = clip_grad_norm(self.model.parameters(), max_norm)
        if self.scaler.enabled:
            self.scaler.step(self.optimizer)  # skips a step whose fp16 gradients overflowed (on the device when fused)
        else:
            norm = float(norm)  # the step's one host synchronisation: the update must not reach the weights if not finite
            if math.isfinite(norm):
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm
