"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over ranks as DTensors.

One FSDP unit per transformer block, then the root (embedding, tied lm_head, final norm). A unit's parameters
are all-gathered just before its forward and (with reshard_after_forward) freed right after, and again for
its backward; gradients are reduce-scattered (after every micro-batch) so each rank keeps only its shard, and
the optimizer steps on shards. reshard_after_forward=True is ZeRO-3-like (least memory); False keeps the gathered parameters from
forward to backward, ZeRO-2-like (one all-gather fewer per step).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from dist_gpt.errors import UserError
from dist_gpt.parallel.base import ensure_process_group, transformer_blocks
from dist_gpt.parallel.single import SingleDevice
from dist_gpt.runtime.precision import HALF_DTYPES


class FSDPStrategy(SingleDevice):
    name = "fsdp"

    def parallelize(self, model: nn.Module) -> nn.Module:
        world = self.env.world_size
        vocab = model.config.vocab_size
        if vocab % world:
            # FSDP2 shards dim 0. Uneven embedding shards gave wrong losses after a resume in torchtitan #1136.
            raise UserError(
                f"model.vocab_size={vocab} is not divisible by the world size {world}: FSDP shards the embedding's "
                f"rows evenly; use the padded vocabulary (model.vocab_size=50304, a multiple of 64) or a world size dividing {vocab}"
            )
        ensure_process_group(self.env, self.config.parallel.backend, cpu_tensors=self.config.parallel.fsdp_cpu_offload)
        if world == 1 and self.env.is_main:
            print("fsdp on a world of 1 process: parameters are not sharded (each shard is the whole tensor); launch with `python launch/train.py --nproc_per_node=N ...` to shard", flush=True)
        p = self.config.parallel
        if p.fsdp_cpu_offload and self.scaler.enabled and self.env.device.type == "cuda":
            # The overflow flag of CPU-offloaded gradient shards would be all-reduced as a CPU tensor over NCCL.
            raise UserError("train.dtype=fp16 with parallel.fsdp_cpu_offload=true is not supported: use bf16 or fp32 with offload, or fp16 without it (or DeepSpeed's zero3-offload.json)")
        kwargs = dict(
            mesh=init_device_mesh(self.env.device.type, (world,)),
            reshard_after_forward=p.fsdp_reshard_after_forward,
            mp_policy=self.mixed_precision(),
            # Pinned (page-locked) host memory makes the host<->GPU copies asynchronous; it needs an accelerator.
            offload_policy=CPUOffloadPolicy(pin_memory=self.env.device.type == "cuda") if p.fsdp_cpu_offload else OffloadPolicy(),
        )
        for block in transformer_blocks(model):
            fully_shard(block, **kwargs)
        # The root unit holds what no block owns: wte (= lm_head.weight, tied: one parameter, sharded once), ln_f.
        fully_shard(model, **kwargs)
        return model

    def mixed_precision(self) -> MixedPrecisionPolicy:
        """bf16 or fp16 compute: parameters gathered in that dtype (half the all-gather bytes), gradients
        reduced in fp32 and the sharded master weights kept in fp32. fp16's loss scaling is the base class's
        GradScaler: its overflow check on the DTensor gradient shards is agreed over the mesh by torch."""
        if self.env.compute_dtype in HALF_DTYPES:
            return MixedPrecisionPolicy(param_dtype=self.env.compute_dtype, reduce_dtype=torch.float32)
        return MixedPrecisionPolicy()

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # FSDP's MixedPrecisionPolicy does the casting

    def forward_backward(self, x, y, loss_scale, sync_grads):
        # Every micro-batch reduce-scatters its gradients (sync_grads is ignored), as torchtitan does: skipping
        # the sync keeps each rank's gradients unsharded and in fp32 until the last micro-batch (4 bytes per
        # parameter on every rank: gpt2-xl on 8 ranks ~6.2 GB instead of ~0.8 GB), which is what FSDP is used
        # to avoid and what the memory model (sharded gradients) assumes. The price: one reduce-scatter per
        # micro-batch instead of per step, overlapped with the backward.
        self.model.set_requires_gradient_sync(True)
        return super().forward_backward(x, y, loss_scale, sync_grads)
