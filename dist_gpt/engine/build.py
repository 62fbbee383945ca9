"""The one build path: a resolved config and the process's place in the world -> the wrapped strategy with
its model and optimizer. The trainer, the bench and the autotuner's trials all build here, so they train
the same thing; `dist_gpt.step.train_step` then runs a step on what this builds."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from dist_gpt.config import Config
from dist_gpt.errors import UserError
from dist_gpt.model import GPT, SHAPE_FIELDS
from dist_gpt.parallel import BatchShape, OptimizerFactory, Strategy, build_strategy
from dist_gpt.runtime.distributed import DistEnv

# What an imported model must agree on with the config; vocab_size (the padding) and bias are the importer's.
# rope_theta too: an export keeps its own, and checkpoints and exports of the run are rebuilt from the config.
INIT_FROM_FIELDS = tuple(f for f in SHAPE_FIELDS if f not in ("vocab_size", "bias")) + ("rope_theta",)


@dataclass
class Built:
    """A strategy holding the model and optimizer, ready to step."""

    strategy: Strategy
    model: GPT  # the plain GPT inside the strategy's wrappers (its hooks see every forward)
    batch: BatchShape
    flops_per_token: int  # counted before wrapping (sharding leaves no whole parameters to count)
    params: int  # all parameters (a tied wte/lm_head once), counted before wrapping too
    compiled: bool  # its blocks run through torch.compile
    loaded_from: str = "scratch"  # what model.init_from loaded, in words, for the run's first line


def build(config: Config, env: DistEnv, batch: BatchShape) -> Built:
    """The model (from scratch or config.model.init_from; compiled per block as train.compile says), the same
    initial weights on every rank, wrapped by the configured strategy with AdamW."""
    strategy = build_strategy(config, env)
    torch.manual_seed(config.train.seed)  # the same initial weights on every rank, whatever rank-specific seeding did
    model = build_model(config)
    compiled = wants_compile(config.train.compile, env.device, strategy)
    if compiled:
        compile_blocks(model)
    flops_per_token, params = model.flops_per_token(), model.num_params(non_embedding=False)
    strategy.wrap(model, make_optimizer_factory(config, env.device), batch)
    return Built(strategy, model, batch, flops_per_token, params, compiled, describe_init(config))


def describe_init(config: Config) -> str:
    """What model.init_from loads, in words, for the run's first line."""
    if config.model.init_from == "scratch":
        return "scratch"
    from dist_gpt.interop import describe_source

    return describe_source(config.model.init_from, config.model.position)


def build_model(config: Config) -> GPT:
    """From scratch, or model.init_from read by interop.load_model: OpenAI's GPT-2 weights (a hub name or local
    HF dir), one of our exports (a .safetensors file, a directory written by `export --hf`) or a run's checkpoint."""
    source = config.model.init_from
    overrides = dict(
        dropout=config.model.dropout,
        attn_backend=config.model.attn_backend,
        loss=config.model.loss,
        loss_chunk_tokens=config.model.loss_chunk_tokens,
        block_size=config.model.block_size,
    )
    if source == "scratch":
        return GPT(config.model.gpt_config())
    from dist_gpt.interop import load_model

    # position, rope_theta and tie_embeddings: the config's for OpenAI's GPT-2, which does not say them; our
    # formats record their own, which the check below holds to the config
    defaults = dict(position=config.model.position, rope_theta=config.model.rope_theta, tie_embeddings=config.model.tie_embeddings)
    model = load_model(source, defaults, **overrides)
    # The run's config must describe the model it trains: checkpoints, exports and FLOP counts are built from it.
    mismatched = [f"{k}={getattr(model.config, k)}" for k in INIT_FROM_FIELDS if getattr(model.config, k) != getattr(config.model, k)]
    if mismatched:
        raise UserError(f"model.init_from={source} is a model with {', '.join(mismatched)}, which the config does not say: set those model.* keys (or the matching model.preset)")
    return model


def wants_compile(setting: bool | str, device: torch.device, strategy: Strategy | None = None) -> bool:
    """train.compile auto: on for CUDA, where fusing the memory-bound parts (LayerNorm, GELU, residual adds,
    RoPE) pays for the compile within a few steps, unless the strategy's wrappers break the compiled graphs
    (DeepSpeed ZeRO-3); off elsewhere (on CPU ~5 % faster for a ~30 s cold compile)."""
    if setting != "auto":
        return bool(setting)
    return device.type == "cuda" and (strategy is None or strategy.compiles_by_default)


def compile_blocks(model: GPT) -> None:
    """torch.compile each transformer block in place: per block works the same under DDP, FSDP and DeepSpeed,
    and leaves the chunked loss (a custom autograd function) eager."""
    for block in model.h:
        block.compile()


def make_optimizer_factory(config: Config, device: torch.device) -> OptimizerFactory:
    """AdamW; weight decay only on matrices (>= 2-D: linear weights, embeddings), never on biases or norms."""
    t = config.train

    def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        fused = device.type == "cuda"  # one kernel for all parameters; on CPU foreach is the fast path
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=fused or None, foreach=None if fused else True)

    return make_optimizer


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
