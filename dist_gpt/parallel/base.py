"""The one interface every parallelism strategy implements; the trainer talks only to this."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from concurrent.futures import Future
from pathlib import Path
from typing import Callable

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from dist_gpt.config import Config
from dist_gpt.distributed import DistEnv

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


class Strategy(ABC):
    """Wraps a model and its optimizer and runs the parts of a training step that parallelism changes."""

    name: str = "base"

    def __init__(self, config: Config, env: DistEnv):
        self.config, self.env = config, env
        self.model: nn.Module | None = None  # the wrapped model (what forward runs)
        self.optimizer: torch.optim.Optimizer | None = None

    @abstractmethod
    def wrap(self, model: nn.Module, make_optimizer: OptimizerFactory) -> None:
        """Take the plain model (on CPU or its device) and build self.model and self.optimizer."""

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on CUDA when the config asks for bf16; strategies that cast parameters themselves
        (FSDP mixed precision, DeepSpeed bf16) return a null context."""
        if self.env.compute_dtype == torch.bfloat16:
            return torch.autocast(device_type=self.env.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @abstractmethod
    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, loss_scale: float, sync_grads: bool) -> torch.Tensor:
        """Forward, then backward of loss * loss_scale. sync_grads is False on every micro-batch but the last
        of an accumulation, so gradient communication happens once per optimizer step. Returns the loss
        (unscaled, detached)."""

    @abstractmethod
    def clip_and_step(self, max_norm: float) -> float:
        """Clip the global gradient norm (max_norm 0 = no clipping), step the optimizer, zero the gradients.
        Returns the gradient norm before clipping (the same on every rank)."""

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

    def memory_stats(self) -> dict[str, float]:
        """Peak memory of this process in MB (CUDA allocator peaks on GPU, resident set on CPU)."""
        from dist_gpt.metrics import memory_stats

        return memory_stats(self.env.device)

    # ------------------------------------------------------------------ checkpointing

    def save_checkpoint(self, path: Path, async_save: bool = False) -> Future | None:
        """Write model and optimizer state into the directory `path`, every rank its own shards, through
        torch.distributed.checkpoint (DCP). With async_save the state is staged to CPU memory and written by a
        background thread: the returned future completes when the files are on disk."""
        state = self._tensor_state()
        if async_save:
            return dcp.async_save(state, checkpoint_id=str(path))
        dcp.save(state, checkpoint_id=str(path))
        return None

    def load_checkpoint(self, path: Path, manifest: dict) -> None:
        """Load what save_checkpoint wrote, resharding to this run's world size and strategy when they differ
        (DCP reads each tensor's shards into whatever layout this run's model has)."""
        state = self._tensor_state()
        dcp.load(state, checkpoint_id=str(path))
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        optim_state["state"] = state["optimizer_state"]
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=optim_state)

    def _tensor_state(self) -> dict:
        """Only tensors: DCP unpickles non-tensor values on load, and a checkpoint must never need that.
        The optimizer's param_groups (hyperparameters) come from the config instead."""
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        if not optim_state.get("state"):
            # A fresh optimizer has no state yet: create it (zeros) so there are tensors to load into.
            _init_optimizer_state(self.optimizer)
            model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optimizer_state": optim_state["state"]}


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
