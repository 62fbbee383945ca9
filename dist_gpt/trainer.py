"""The training loop, top to bottom. It never branches on the parallelism strategy: the strategy does."""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn

from dist_gpt.checkpoint import Checkpointer
from dist_gpt.config import Config, check_runtime
from dist_gpt.data import TokenLoader, read_meta
from dist_gpt.distributed import DistEnv, all_reduce_mean, all_reduce_sum, destroy_distributed, init_distributed
from dist_gpt.errors import UserError
from dist_gpt.metrics import MetricsLogger, device_peak_flops
from dist_gpt.model import GPT
from dist_gpt.parallel import Strategy, build_strategy
from dist_gpt.schedule import CosineSchedule

WARMUP_STEPS_EXCLUDED = 3  # first steps (allocator warm-up, compilation) are left out of the throughput summary


@dataclass
class TrainState:
    """The loop's own position; checkpointed with everything else."""

    step: int = 0
    tokens_seen: int = 0
    wandb_run_id: str | None = None

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen, self.wandb_run_id = int(state["step"]), int(state["tokens_seen"]), state.get("wandb_run_id")


def build_model(config: Config) -> GPT:
    """From scratch, from OpenAI's GPT-2 weights (a hub name or local HF dir), or from one of our exports."""
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
    from dist_gpt import pretrained

    if source.endswith(".safetensors"):
        model = pretrained.load_exported(source, **overrides)
    else:
        model = pretrained.load_hf_gpt2(source, position=config.model.position, rope_theta=config.model.rope_theta, **overrides)
    # The run's config must describe the model it trains: checkpoints, exports and FLOP counts are built from it.
    mismatched = [f"{k}={getattr(model.config, k)}" for k in ("n_layer", "n_head", "n_embd", "position") if getattr(model.config, k) != getattr(config.model, k)]
    if mismatched:
        raise UserError(f"model.init_from={source} is a model with {', '.join(mismatched)}, which the config does not say: set those model.* keys (or the matching model.preset)")
    return model


def compile_blocks(model: GPT) -> None:
    """torch.compile each transformer block in place: per block works the same under DDP, FSDP and DeepSpeed,
    and leaves the chunked loss (a custom autograd function) eager."""
    for block in model.h:
        block.compile()


def make_optimizer_factory(config: Config, device: torch.device):
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


def resolve_micro_batch_size(config: Config, env: DistEnv, strategy_name: str) -> int:
    if config.train.micro_batch_size != "auto":
        return int(config.train.micro_batch_size)
    from dist_gpt.autotune_batch import autotune_for_training

    return autotune_for_training(config, env, strategy_name)


@torch.no_grad()
def evaluate(strategy: Strategy, config: Config, env: DistEnv, micro_batch_size: int) -> float:
    """Mean val loss over one fixed set of windows (eval_batches x micro_batch_size of them, a fixed seed), so
    successive evals compare the model, not the sample, and any world size evaluates the same windows: rank r
    takes windows r, r + world, r + 2 world, ... Every rank runs the same number of forwards (a sharded model
    gathers inside forward), a rank with nothing left running a zero-weight one."""
    loader = TokenLoader(config.data_dir / "val.bin", config.model.block_size, micro_batch_size, seed=config.train.seed + 1, device=env.device)
    mine = np.arange(env.rank, config.train.eval_batches * micro_batch_size, env.world_size)
    forwards = math.ceil(math.ceil(config.train.eval_batches * micro_batch_size / env.world_size) / micro_batch_size)
    loss_sum = torch.zeros((), device=env.device, dtype=torch.float64)
    windows = torch.zeros((), device=env.device, dtype=torch.float64)
    for i in range(forwards):
        numbers = mine[i * micro_batch_size : (i + 1) * micro_batch_size]
        x, y = loader.windows(numbers if len(numbers) else np.zeros(1, np.int64))
        loss = strategy.eval_loss(x, y).double()
        loss_sum += loss * len(numbers)  # every window has block_size targets: weighting by windows is exact
        windows += len(numbers)
    return (all_reduce_sum(loss_sum) / all_reduce_sum(windows)).item()


def train(config: Config) -> dict:
    """Run (or resume) a training run. Returns a summary: final losses, throughput, where the run lives."""
    env = init_distributed(config.train.device, config.train.dtype, config.parallel.backend)
    try:
        return _train(config, env)
    finally:
        destroy_distributed()


def _train(config: Config, env: DistEnv) -> dict:
    t = config.train
    meta = read_meta(config.data_dir)
    seed_everything(t.seed + env.rank)
    if env.device.type == "cpu":
        from dist_gpt.runtime import keep_freed_memory

        keep_freed_memory()  # big per-step buffers stay mapped instead of page-faulting every step

    strategy = build_strategy(config, env)
    micro_batch = resolve_micro_batch_size(config, env, strategy.name)
    grad_accum = check_runtime(config, env.world_size, env.device.type, micro_batch)
    torch.manual_seed(t.seed)  # the same initial weights on every rank, whatever rank-specific seeding did
    model = build_model(config)
    if t.compile:
        compile_blocks(model)
    flops_per_token = model.flops_per_token()
    strategy.configure_batch(micro_batch, grad_accum)  # DeepSpeed bakes the batch shape into its engine
    strategy.wrap(model, make_optimizer_factory(config, env.device))
    attention = model.attention_backend()  # probed after the move to the device: what really runs there

    loader = TokenLoader(config.data_dir / "train.bin", config.model.block_size, micro_batch, env.rank, env.world_size, seed=t.seed, device=env.device)
    schedule = CosineSchedule(t.lr, t.min_lr, t.warmup_steps, t.lr_decay_steps or t.max_steps)
    state = TrainState()
    peak_flops, peak_source = device_peak_flops(env.device, env.compute_dtype)  # before the RNG is set: it draws random matrices
    checkpointer = Checkpointer(config, env, strategy, {"loader": loader, "train_state": state})
    resumed_from = checkpointer.resume()
    if not checkpointer.rng_restored:  # a resumed rank continues its saved RNG stream (dropout), bit for bit
        seed_everything(t.seed + env.rank + state.step)  # a fresh run, or a rank the saving run did not have

    metrics = MetricsLogger(config.run_dir, env.is_main, config.logging.wandb, config.logging.wandb_project, config.to_dict(), state.wandb_run_id)
    state.wandb_run_id = metrics.wandb_run_id
    tokens_per_step = micro_batch * grad_accum * env.world_size * config.model.block_size
    if env.is_main:
        print(
            f"run {config.run_dir} | {strategy.name} on {env.world_size} x {env.device.type} | {env.compute_dtype} | "
            f"{model.num_params() / 1e6:.2f}M params | micro-batch {micro_batch} x grad-accum {grad_accum} x world {env.world_size} "
            f"= {tokens_per_step:,} tokens/step | train {meta['train_tokens']:,} tokens | attention {attention} | "
            f"peak {peak_flops / 1e12:.3f} TFLOP/s ({peak_source})"
            + (f" | resumed from {resumed_from} at step {state.step}" if resumed_from else ""),
            flush=True,
        )

    if state.step >= t.max_steps and env.is_main:
        print(f"this run is already complete at step {state.step} (train.max_steps={t.max_steps}): raise train.max_steps to train on, or start another run with train.run_name=NAME", flush=True)
    timed_tokens, timed_seconds, steps_this_process = 0, 0.0, 0
    train_loss = val_loss = math.nan
    stop_reason = None
    with checkpointer.stop_signals():
        while state.step < t.max_steps:
            step_start = time.perf_counter()
            lr = schedule(state.step)
            strategy.set_lr(lr)
            loss_sum = torch.zeros((), device=env.device)
            for micro_step in range(grad_accum):
                x, y = loader.next_batch()
                loss_sum += strategy.forward_backward(x, y, 1.0 / grad_accum, sync_grads=micro_step == grad_accum - 1)
            grad_norm = strategy.clip_and_step(t.grad_clip)
            state.step += 1
            state.tokens_seen += tokens_per_step

            step_seconds = time.perf_counter() - step_start  # clip_and_step synchronises (grad norm .item())
            steps_this_process += 1
            if steps_this_process > WARMUP_STEPS_EXCLUDED:
                timed_tokens, timed_seconds = timed_tokens + tokens_per_step, timed_seconds + step_seconds
            if state.step % config.logging.log_every == 0 or state.step == t.max_steps:
                train_loss = all_reduce_mean(loss_sum / grad_accum).item()
                tokens_per_s = tokens_per_step / step_seconds
                record = {
                    "step": state.step,
                    "tokens": state.tokens_seen,
                    "loss": train_loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "ms_per_step": step_seconds * 1e3,
                    "tokens_per_s": tokens_per_s,
                    "mfu": tokens_per_s * flops_per_token / (peak_flops * env.world_size),
                    **strategy.memory_stats(),
                }
                metrics.log(record, console=format_record(record))
            if (t.eval_every and state.step % t.eval_every == 0) or state.step == t.max_steps:
                val_loss = evaluate(strategy, config, env, micro_batch)
                metrics.log({"step": state.step, "tokens": state.tokens_seen, "val_loss": val_loss}, console=f"step {state.step:6d} | val loss {val_loss:.4f}")
            checkpointer.poll()
            stop_reason = checkpointer.should_stop()
            if checkpointer.due(state.step) or state.step == t.max_steps or stop_reason:
                checkpointer.save(state.step)
            if stop_reason:
                if env.is_main:
                    print(f"stopping on {stop_reason} after step {state.step}: checkpoint saved; the same command resumes", flush=True)
                break
    checkpointer.finish()

    summary = {
        "run_dir": str(config.run_dir),
        "strategy": strategy.name,
        "step": state.step,
        "stopped_by": stop_reason,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "tokens_per_s": timed_tokens / timed_seconds if timed_seconds else math.nan,
        "mfu": timed_tokens / timed_seconds * flops_per_token / (peak_flops * env.world_size) if timed_seconds else math.nan,
        "micro_batch_size": micro_batch,
        "grad_accum_steps": grad_accum,
    }
    metrics.log({"summary": summary}, console=f"done: {summary}")
    metrics.close()
    return summary


def format_record(r: dict) -> str:
    memory = " | ".join(f"{k.removeprefix('mem_').removesuffix('_mb')} {v:,.0f} MB" for k, v in r.items() if k.startswith("mem_"))
    return (
        f"step {r['step']:6d} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | grad norm {r['grad_norm']:.3f} | "
        f"{r['ms_per_step']:.0f} ms | {r['tokens_per_s']:,.0f} tok/s | MFU {100 * r['mfu']:.1f}% | {memory}"
    )
