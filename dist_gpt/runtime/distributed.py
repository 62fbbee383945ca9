"""The process group and this process's place in it, read from what torchrun / deepspeed set."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dist_gpt.runtime.precision import DeviceFacts, choose_dtype, enable_tf32


@dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    compute_dtype: torch.dtype = torch.float32  # bf16/fp16 mean autocast (or the strategy's own casting); fp16 adds loss scaling

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "auto":
        if torch.cuda.is_available():
            requested = "cuda"
        elif torch.backends.mps.is_available():
            requested = "mps"
        else:
            requested = "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            from dist_gpt.errors import UserError

            raise UserError("train.device=cuda but no CUDA GPU is visible: use train.device=auto or cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(requested)


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    return choose_dtype(requested, DeviceFacts.of(device))


def pick_backend(requested: str, device: torch.device, cpu_tensors: bool = False) -> str:
    """parallel.backend: `auto` is nccl for CUDA tensors, gloo for CPU ones.

    cpu_tensors: a GPU run whose collectives also see CPU tensors (FSDP with parallel.fsdp_cpu_offload: its
    gradient shards live on the host, and clip_grad_norm all-reduces their norm there). A NCCL-only group fails
    on those ("No backend type associated with device type cpu"), so the group gets both backends, each
    collective going to the one for its tensors' device (torchtune's fix, pytorch#148532)."""
    if device.type == "cuda" and cpu_tensors and requested in ("auto", "nccl"):
        return "cpu:gloo,cuda:nccl"
    if requested == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    return requested


def init_distributed(device: str = "auto", dtype: str = "auto", backend: str = "auto", cpu_tensors: bool = False) -> DistEnv:
    """Join the process group when launched with WORLD_SIZE > 1 (torchrun, deepspeed); else a world of one.
    cpu_tensors: see pick_backend (parallel.fsdp_cpu_offload)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        enable_tf32()  # fp32 matmuls (train.dtype=fp32, and fp32 parts of mixed precision) on tensor cores
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=pick_backend(backend, dev, cpu_tensors), timeout=datetime.timedelta(minutes=30), device_id=dev if dev.type == "cuda" else None)
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=dev, compute_dtype=pick_dtype(dtype, dev))


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (no-op on a world of one)."""
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_reduce_max(values: list[float]) -> list[float]:
    """Element-wise maximum over ranks of a few numbers (the values themselves on a world of one): how ranks
    agree on a flag or a worst case. The tensor lives where the backend needs it (CUDA for nccl)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in dist.get_backend() else torch.device("cpu")
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def broadcast_from_main(value):
    """Rank 0's value (any picklable object) on every rank: how ranks learn what only rank 0 found out."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks (no-op on a world of one). gloo has no AVG: sum, then divide."""
    if dist.is_available() and dist.is_initialized():
        return all_reduce_sum(value) / dist.get_world_size()
    return value


def any_rank(*flags: bool) -> list[bool]:
    """For each flag, True on every rank if it is true on any rank: how ranks take the same branch. One
    all-reduce for all the flags together (each is a host sync on the device of the backend)."""
    return [bool(value) for value in all_reduce_max([float(flag) for flag in flags])]


def gather_objects(mine) -> list:
    """Every rank's `mine` (any picklable value), in rank order; [mine] on a world of one."""
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return gathered


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
