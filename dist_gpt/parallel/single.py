"""One device, no communication: the reference every other strategy must match."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from dist_gpt.parallel.base import OptimizerFactory, Strategy


class SingleDevice(Strategy):
    name = "single"

    def wrap(self, model: nn.Module, make_optimizer: OptimizerFactory) -> None:
        self.model = model.to(self.env.device)
        self.optimizer = make_optimizer(self.model)

    def forward_backward(self, x, y, loss_scale, sync_grads):
        with self.autocast():
            loss = self.model(x, y)
        (loss * loss_scale).backward()
        return loss.detach()

    def clip_and_step(self, max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm or math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)
