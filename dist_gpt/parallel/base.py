"""The one interface every parallelism strategy implements; the trainer talks only to this."""

from __future__ import annotations

import contextlib
import functools
import math
import re
from abc import ABC, abstractmethod
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.utils.checkpoint import checkpoint

from dist_gpt.config import Config
from dist_gpt.runtime.distributed import DistEnv, pick_backend
from dist_gpt.runtime.precision import HALF_DTYPES, MIN_LOSS_SCALE, LossScaler

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


@dataclass(frozen=True)
class BatchShape:
    """Sequences per rank per forward, and forwards per optimizer step."""

    micro_batch_size: int
    grad_accum_steps: int


class Strategy(ABC):
    """Wraps a model and its optimizer and runs the parts of a training step that parallelism changes."""

    name: str = "base"
    # How its checkpoint names a file one rank wrote (group 1: the rank). DCP: __RANK_N.distcp; .metadata is rank 0's.
    RANK_FILE = re.compile(r"__(\d+)_")
    scales_fp16_loss_itself = False  # DeepSpeed's engine does (its "fp16" section); the others use self.scaler

    def __init__(self, config: Config, env: DistEnv):
        self.config, self.env = config, env
        self.model: nn.Module | None = None  # the wrapped model (what forward runs)
        self.unwrapped_model: nn.Module | None = None  # the GPT inside (its state dict keys are the plain ones)
        self.optimizer: torch.optim.Optimizer | None = None
        self.async_save_group = None  # DCP's background writer's own process group, made at the first async save
        # fp16's dynamic loss scaling; a pass-through otherwise. A stateful part of the checkpoint (JSON).
        self.scaler = LossScaler(env.compute_dtype == torch.float16 and not self.scales_fp16_loss_itself, env.device)

    @abstractmethod
    def wrap(self, model: nn.Module, make_optimizer: OptimizerFactory, batch: BatchShape) -> None:
        """Take the plain model (on CPU or its device) and build self.model and self.optimizer. `batch` is
        the run's resolved batch shape: most strategies ignore it; DeepSpeed bakes it into its engine."""

    def prepare_model(self, model: nn.Module, to_device: bool = True) -> nn.Module:
        """What every strategy does to the plain model before wrapping it: move it to the device (unless the
        wrapper places parameters itself) and apply activation checkpointing when asked."""
        if to_device:
            model = model.to(self.env.device)
        if self.config.parallel.activation_checkpointing:
            apply_activation_checkpointing(model)
        self.unwrapped_model = model
        return model

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 or fp16 autocast when the run computes in one; strategies that cast parameters themselves
        (FSDP mixed precision, DeepSpeed bf16/fp16) return a null context."""
        if self.env.compute_dtype in HALF_DTYPES:
            return torch.autocast(device_type=self.env.device.type, dtype=self.env.compute_dtype)
        return contextlib.nullcontext()

    @abstractmethod
    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, loss_scale: float, sync_grads: bool) -> torch.Tensor:
        """Forward, then backward of loss * loss_scale. sync_grads is False on every micro-batch but the last
        of an accumulation, so gradient communication happens once per optimizer step. Returns the loss
        (unscaled, detached)."""

    @abstractmethod
    def clip_and_step(self, max_norm: float) -> torch.Tensor | float:
        """Unscale fp16 gradients, clip the global gradient norm (max_norm 0 = no clipping), step the optimizer,
        zero the gradients. Returns the gradient norm before clipping (the same on every rank). A norm that is
        not finite skips the optimizer step (the gradients are dropped): every rank sees the same norm, so every
        rank skips; with fp16 the loss scaler does that skip (on the device with a fused AdamW) and lowers its
        scale."""

    @property
    def compiles_by_default(self) -> bool:
        """Whether train.compile=auto compiles the blocks on CUDA under this strategy."""
        return True

    def skipped_for_overflow(self) -> bool:
        """After a step whose gradients were not finite: True when fp16 loss scaling explains it (an overflow,
        expected while the scale settles: the scale was lowered and is still above MIN_LOSS_SCALE), False when
        it is divergence. Reads the scale from the device: asked only after such a step."""
        return self.scaler.enabled and self.scaler.current_scale() > MIN_LOSS_SCALE

    def loss_scale_stats(self) -> dict[str, float]:
        """fp16's current loss scale and the steps skipped on overflow so far ({} without fp16). Reads from
        the device: for log steps."""
        return self.scaler.stats()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @torch.no_grad()
    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Loss without gradients; every rank must call it (sharded models gather inside forward)."""
        self.model.eval()
        with self.autocast():
            loss = self.model(x, y)
        self.model.train()
        return loss.detach()

    @torch.no_grad()
    def eval_logits(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The logits at `positions` (a bool mask), without gradients (task evals such as HellaSwag); every
        rank must call it, as eval_loss."""
        self.model.eval()
        with self.autocast():
            logits = self.model(x, positions=positions)
        self.model.train()
        return logits

    @torch.no_grad()
    def local_weights_finite(self) -> bool:
        """Whether this rank's part of the weights (its FSDP or ZeRO-3 shard, else the whole model) is finite:
        asked before every checkpoint, so diverged weights are never written. The caller agrees over ranks."""
        checks = [torch.isfinite(t).all() for t in map(_local_part, self.unwrapped_model.parameters()) if t.numel()]
        return bool(torch.stack(checks).all()) if checks else True  # one host sync; a rank may hold no elements

    def memory_stats(self) -> dict[str, float]:
        """Peak memory of this process in MB (CUDA allocator peaks on GPU, resident set on CPU)."""
        from dist_gpt.runtime.metrics import memory_stats

        return memory_stats(self.env.device)

    # ------------------------------------------------------------------ checkpointing

    def save_checkpoint(self, path: Path, async_save: bool = False) -> Future | None:
        """Write model and optimizer state into the directory `path`, every rank its own shards, through
        torch.distributed.checkpoint (DCP). With async_save the state is staged to CPU memory and written by a
        background thread: the returned future completes when the files are on disk."""
        state = self._tensor_state()
        no_dist = not dist.is_initialized()  # one process without a group: DCP then needs no collectives
        if async_save:
            if not no_dist and self.async_save_group is None:
                # The writer thread's collectives (plans, metadata) on the loop's group would interleave with the
                # loop's own differently on each rank and hang; a group of its own keeps them apart.
                self.async_save_group = dist.new_group(backend="gloo")
            return dcp.async_save(state, checkpoint_id=str(path), no_dist=no_dist, process_group=self.async_save_group)
        dcp.save(state, checkpoint_id=str(path), no_dist=no_dist)
        return None

    def load_checkpoint(self, path: Path, manifest: dict) -> None:
        """Load what save_checkpoint wrote, resharding to this run's world size and strategy when they differ
        (DCP reads each tensor's shards into whatever layout this run's model has)."""
        state = self._tensor_state()
        dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        optim_state["state"] = state["optimizer_state"]
        restore_tied(state["model"], self.unwrapped_model)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=optim_state)

    @classmethod
    def checkpoint_file_rank(cls, name: str) -> int | None:
        """The rank that wrote the checkpoint file `name` (it checksums it: on several nodes a rank may not
        see another node's files until they are flushed), or None for a file of rank 0's."""
        owner = cls.RANK_FILE.match(name)
        return int(owner[1]) if owner else None

    @classmethod
    def consolidated_model_state(cls, ckpt_dir: Path, config: Config) -> dict[str, torch.Tensor]:
        """The full model weights of a checkpoint this strategy saved, in one process with no process group.
        DCP reads the shards of any world size straight into full tensors."""
        from dist_gpt.model import GPT

        model = GPT(config.model.gpt_config())
        state = {"model": without_tied(model.state_dict(), model)}
        dcp.load(state, checkpoint_id=str(ckpt_dir), no_dist=True)
        return restore_tied(state["model"], model)

    def _tensor_state(self) -> dict:
        """Only tensors: DCP unpickles non-tensor values on load, and a checkpoint must never need that.
        The optimizer's param_groups (hyperparameters) come from the config instead."""
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        if not optim_state.get("state"):
            # A fresh optimizer has no state yet: create it (zeros) so there are tensors to load into.
            _init_optimizer_state(self.optimizer)
            model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": without_tied(model_state, self.unwrapped_model), "optimizer_state": optim_state["state"]}


def tied_aliases(module: nn.Module) -> dict[str, str]:
    """{alias: owner} for parameters registered under two names (lm_head.weight -> wte.weight when tied)."""
    owners: dict[int, str] = {}
    aliases = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        owner = owners.setdefault(id(param), name)
        if owner != name:
            aliases[name] = owner
    return aliases


def without_tied(model_state: dict, module: nn.Module) -> dict:
    """The model state with each tied parameter once: a state dict lists it under both names, and DCP would
    write (and read) the V x C embedding twice (+154 MB per GPT-2 124M checkpoint). Older checkpoints that hold
    both keys still load: DCP reads only the keys asked for."""
    aliases = tied_aliases(module)
    return {key: value for key, value in model_state.items() if key not in aliases}


def restore_tied(model_state: dict, module: nn.Module) -> dict:
    """Put each alias back as its owner's tensor (the same object: loading keeps the parameters tied)."""
    for alias, owner in tied_aliases(module).items():
        if owner in model_state:
            model_state[alias] = model_state[owner]
    return model_state


def _init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Run one step with zero gradients and lr 0 so AdamW allocates its moments; then zero them again."""
    saved = [(g["lr"], g.get("weight_decay", 0.0)) for g in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"], group["weight_decay"] = 0.0, 0.0
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for group, (lr, wd) in zip(optimizer.param_groups, saved):
        group["lr"], group["weight_decay"] = lr, wd
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value):
                value.zero_()


# ---------------------------------------------------------------------------------------------- helpers


def _local_part(param: torch.Tensor) -> torch.Tensor:
    """The elements of a parameter this rank holds: an FSDP2 DTensor's local shard, a ZeRO-3 partition."""
    if hasattr(param, "to_local"):
        return param.to_local()
    return getattr(param, "ds_tensor", param)


def transformer_blocks(model: nn.Module) -> Iterable[nn.Module]:
    """The repeated blocks: the unit of activation checkpointing and of FSDP sharding."""
    return model.h


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward instead of keeping them (memory for ~1/3 more compute).

    The block's `forward` is replaced on the instance rather than the block wrapped in a `checkpoint_wrapper`
    module: the module tree and its state-dict keys stay the plain ones, so checkpoints and exports are the
    same with and without it. Wrappers that hook a module's call (FSDP unshard, ZeRO-3 gather) still see
    every block's call; non-reentrant checkpointing recomputes inside that block's backward, after those
    wrappers have gathered its parameters again."""
    for block in transformer_blocks(model):
        if getattr(block, "_activation_checkpointed", False):
            continue
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
        block._activation_checkpointed = True


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm (max_norm 0 = only measure it) and return it, a 0-dim tensor on the
    gradients' device (no host synchronisation).

    With FSDP2 the gradients are DTensor shards: clip_grad_norm_ all-reduces the partial norms and returns a
    DTensor, which full_tensor() turns into the same plain value on every rank."""
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm or math.inf)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm.detach()


def ensure_process_group(env: DistEnv, backend: str = "auto", cpu_tensors: bool = False) -> None:
    """Wrappers that need a process group (DDP, FSDP, DeepSpeed) get a group of one when launched as a single
    process: init_distributed only joins a group when WORLD_SIZE > 1. An in-memory store: nothing to listen on."""
    if dist.is_initialized():
        return
    dist.init_process_group(backend=pick_backend(backend, env.device, cpu_tensors), store=dist.HashStore(), rank=0, world_size=1)
