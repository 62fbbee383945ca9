"""DistributedDataParallel: a full replica per rank, gradients averaged by all-reduce during backward."""

from __future__ import annotations

import contextlib

import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_gpt.parallel.base import ensure_process_group
from dist_gpt.parallel.single import SingleDevice


class DDPStrategy(SingleDevice):
    """The single-device step; DDP's hooks all-reduce gradients, so clipping and stepping are unchanged
    (every rank holds the same averaged gradients and takes the same step)."""

    name = "ddp"

    def parallelize(self, model: nn.Module) -> nn.Module:
        ensure_process_group(self.env, self.config.parallel.backend)
        device_ids = [self.env.device.index] if self.env.device.type == "cuda" else None  # CPU: no device ids
        # gradient_as_bucket_view: the .grad tensors are views into DDP's buckets, not a second copy.
        return DDP(model, device_ids=device_ids, gradient_as_bucket_view=True)

    def forward_backward(self, x, y, loss_scale, sync_grads):
        # no_sync: accumulate locally on all but the last micro-batch, all-reduce once per optimizer step.
        with contextlib.nullcontext() if sync_grads else self.model.no_sync():
            return super().forward_backward(x, y, loss_scale, sync_grads)
