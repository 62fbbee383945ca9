"""The training loop, top to bottom. It never branches on the parallelism strategy: the strategy does."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass

import torch

from dist_gpt.checkpoint.checkpointer import Checkpointer
from dist_gpt.checkpoint.resume import DataRecord
from dist_gpt.config import Config, check_runtime
from dist_gpt.data import TokenLoader, read_meta
from dist_gpt.data.check import check_prepared_data
from dist_gpt.data.prepare import data_identity, prepare_command
from dist_gpt.engine.build import build, seed_everything
from dist_gpt.engine.schedule import CosineSchedule, schedule_notice
from dist_gpt.engine.step import train_step
from dist_gpt.engine.step_guard import DivergenceGuard
from dist_gpt.errors import UserError
from dist_gpt.eval.tasks import EvalTasks, format_scores
from dist_gpt.eval.val_loss import evaluate
from dist_gpt.parallel import BatchShape
from dist_gpt.runtime.distributed import DistEnv, all_reduce_mean, destroy_distributed, init_distributed
from dist_gpt.runtime.metrics import MetricsLogger, device_peak
from dist_gpt.runtime.precision import dtype_description, dtype_name, dtype_notice
from dist_gpt.train.run_lock import hold_run_dir
from dist_gpt.train.time_budget import TimeBudget, effective_time_limit, seconds_left

WARMUP_STEPS_EXCLUDED = 3  # first steps (allocator warm-up, compilation) are left out of the throughput summary


@dataclass
class TrainState:
    """The loop's own position; checkpointed with everything else."""

    step: int = 0
    tokens_seen: int = 0
    wandb_run_id: str | None = None
    global_batch: int = 0  # sequences per optimizer step: a resume keeps it (dist_gpt.train.run.keep_global_batch)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen, self.wandb_run_id = int(state["step"]), int(state["tokens_seen"]), state.get("wandb_run_id")


def train(config: Config, env: DistEnv | None = None, micro_batch_size: int | None = None) -> dict:
    """Run (or resume) a training run. Returns a summary: final losses, throughput, where the run lives.

    micro_batch_size: the size to train with when train.micro_batch_size is `auto` (dist_gpt.train.run asks the
    autotuner first). Without env, this joins the process group itself, goes through the door (enter_run)
    and leaves the group at the end; with env, the caller has done both."""
    if env is not None:
        return _train(config, env, micro_batch_size)
    env = init_distributed(config.train.device, config.train.dtype, config.parallel.backend, cpu_tensors=config.parallel.fsdp_cpu_offload)
    try:
        with enter_run(config, env):
            return _train(config, env, micro_batch_size)
    finally:
        destroy_distributed()


@contextlib.contextmanager
def enter_run(config: Config, env: DistEnv):
    """The door of a run, before anything is built: its data checked (one line per problem), its directory
    held by global rank 0 for the run's life (a second start on it is refused)."""
    check_prepared_data(config.data_dir, config.model.block_size, config.model.vocab_size, prepare_command(config))
    with hold_run_dir(config.run_dir, env.is_main):
        yield


def _train(config: Config, env: DistEnv, micro_batch_size: int | None) -> dict:
    started = time.perf_counter()
    t = config.train
    micro_batch = micro_batch_size or t.micro_batch_size
    if micro_batch == "auto":
        raise UserError("train.micro_batch_size=auto is chosen before training starts: launch with launch/train.py (or call dist_gpt.run.run_training)")
    meta = read_meta(config.data_dir)
    seed_everything(t.seed + env.rank)
    if env.device.type == "cpu":
        from dist_gpt.runtime.malloc import keep_freed_memory

        keep_freed_memory()  # big per-step buffers stay mapped instead of page-faulting every step

    grad_accum = check_runtime(config, env.world_size, env.device.type, micro_batch)
    built = build(config, env, BatchShape(micro_batch, grad_accum))
    strategy, model, flops_per_token = built.strategy, built.model, built.flops_per_token
    attention = model.attention_backend(env.compute_dtype)  # probed after the move to the device: what really runs there

    loader = TokenLoader(config.data_dir / "train.bin", config.model.block_size, micro_batch, env.rank, env.world_size, seed=t.seed, device=env.device)
    schedule = CosineSchedule(t.lr, t.min_lr, t.warmup_steps, t.lr_decay_steps or t.max_steps)
    state = TrainState(global_batch=micro_batch * grad_accum * env.world_size)
    peak = device_peak(env.device, env.compute_dtype, t.peak_tflops)  # before the RNG is set: it may draw random matrices
    parts = {"loader": loader, "train_state": state, "loss_scaler": strategy.scaler, "data": DataRecord(data_identity(meta))}
    checkpointer = Checkpointer(config, env, strategy, parts)
    resumed_from = checkpointer.resume()
    if not checkpointer.rng_restored:  # a resumed rank continues its saved RNG stream (dropout), bit for bit
        seed_everything(t.seed + env.rank + state.step)  # a fresh run, or a rank the saving run did not have

    metrics = MetricsLogger(config.run_dir, env.is_main, config.logging.wandb, config.logging.wandb_project, config.to_dict(), state.wandb_run_id)
    state.wandb_run_id = metrics.wandb_run_id
    tokens_per_step = micro_batch * grad_accum * env.world_size * config.model.block_size
    limit_seconds, limit_source = effective_time_limit(t.time_limit)
    budget = None
    if limit_seconds and env.is_main:  # rank 0's clock decides; the stop is agreed like a signal's
        eval_in_steps = math.ceil(t.eval_batches / env.world_size) / grad_accum
        budget = TimeBudget(limit_seconds, limit_source, 12 * built.params, eval_in_steps)  # fp32 weights + AdamW's 2 moments
    if env.is_main:
        for notice in (dtype_notice(env.compute_dtype, env.device.type), schedule_notice(t.warmup_steps, t.max_steps)):
            if notice:
                print(notice, flush=True)
        precision = dtype_description(t.dtype, env.compute_dtype, env.device.type)
        print(
            f"run {config.run_dir} | {strategy.name} on {env.world_size} x {env.device.type} | {precision} | compile {'per block' if built.compiled else 'off'} | "
            f"{built.params / 1e6:.2f}M params | micro-batch {micro_batch} x grad-accum {grad_accum} x world {env.world_size} "
            f"= {tokens_per_step:,} tokens/step | train {meta['train_tokens']:,} tokens | attention {attention} | "
            f"peak {peak.flops / 1e12:.3f} TFLOP/s ({peak.source})"
            + (f" | time limit {limit_seconds / 60:.1f} min ({limit_source})" if limit_seconds else "")
            + (f" | resumed from {resumed_from} at step {state.step}" if resumed_from else f" | weights from {built.loaded_from}")
            + (f" | {checkpointer.remote.describe()}" if checkpointer.remote else ""),
            flush=True,
        )

    already_complete = state.step >= t.max_steps
    if already_complete and env.is_main:
        print(f"this run is already complete at step {state.step} (train.max_steps={t.max_steps}): raise train.max_steps to train on, or start another run with train.run_name=NAME", flush=True)
    if not already_complete:  # what this process trains, so a run directory describes itself (dist_gpt.tools.compare reads it)
        metrics.log({"run_start": {"step": state.step, "params": built.params, "world_size": env.world_size, "config": config.to_dict()}})
    timed_tokens, timed_seconds, steps_this_process = 0, 0.0, 0
    train_loss = val_loss = result = None
    logged_step = None
    stop_reason = None
    guard = DivergenceGuard(t.max_skipped_steps)
    tasks = EvalTasks(config, env)  # train.eval_tasks (HellaSwag), read before the first step
    with checkpointer.stop_signals():
        while state.step < t.max_steps:
            step_start = time.perf_counter()
            lr = schedule(state.step)
            strategy.set_lr(lr)
            result = train_step(strategy, loader.next_batch, grad_accum, t.grad_clip)
            state.step += 1
            state.tokens_seen += tokens_per_step
            guard.record(result)

            step_seconds = time.perf_counter() - step_start  # the step synchronises (the grad norm is a float)
            steps_this_process += 1
            if steps_this_process > WARMUP_STEPS_EXCLUDED:
                timed_tokens, timed_seconds = timed_tokens + tokens_per_step, timed_seconds + step_seconds
            if budget:
                budget.record_step(step_seconds)
            if state.step % config.logging.log_every == 0 or state.step == t.max_steps or result.skipped:
                train_loss, logged_step = all_reduce_mean(result.loss).item(), state.step
                tokens_per_s = tokens_per_step / step_seconds
                record = {
                    "step": state.step,
                    "tokens": state.tokens_seen,
                    "loss": train_loss,
                    "lr": lr,
                    "grad_norm": result.grad_norm,
                    **({"skipped": result.skip_reason} if result.skipped else {}),
                    "skipped_steps": guard.total,
                    "ms_per_step": step_seconds * 1e3,
                    "tokens_per_s": tokens_per_s,
                    "mfu": peak.mfu(tokens_per_s * flops_per_token / env.world_size),
                    **strategy.loss_scale_stats(),
                    **strategy.memory_stats(),
                }
                metrics.log(record, console=format_record(record))
            if guard.diverged:
                stop_reason = "divergence"
                break  # no save: the newest checkpoint is the newest good one
            if (t.eval_every and state.step % t.eval_every == 0) or state.step == t.max_steps:
                eval_start = time.perf_counter()
                val_loss = evaluate(strategy, config, env, micro_batch)
                if budget:
                    budget.record_eval(time.perf_counter() - eval_start)
                metrics.log({"step": state.step, "tokens": state.tokens_seen, "val_loss": val_loss}, console=f"step {state.step:6d} | val loss {val_loss:.4f}")
            if tasks.due(state.step):
                scores = tasks.run(strategy)
                metrics.log({"step": state.step, "tokens": state.tokens_seen, **scores}, console=format_scores(state.step, scores))
            if budget and state.step < t.max_steps:
                next_eval = bool(t.eval_every and (state.step + 1) % t.eval_every == 0) or state.step + 1 == t.max_steps
                checkpointer.stop.request(budget.stop_reason(next_eval, checkpointer.seconds_to_save()))
            decision = checkpointer.agree_on_step(state.step)  # one collective: stop? save? publish an async save?
            stop_reason = decision.stop_reason
            periodic = decision.save_due and not guard.consecutive  # amid skips: keep the older, healthier ones
            if periodic or state.step == t.max_steps or stop_reason:
                checkpointer.save(state.step)
            if stop_reason:
                break
        # inside: a second Ctrl-C while the last save is written (or uploaded) is said in one line too
        checkpointer.finish(upload_wait_seconds=min(60 * config.checkpoint.remote_wait_minutes, seconds_left(limit_seconds)))
    if result is not None and logged_step != state.step:  # stopped between log lines: the done line shows the last step's loss
        train_loss = all_reduce_mean(result.loss).item()  # every rank ran the same steps: the collective matches

    summary = {
        "run_dir": str(config.run_dir),
        "strategy": strategy.name,
        "step": state.step,
        "stopped_by": stop_reason,
        "skipped_steps": guard.total,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "tokens_per_s": timed_tokens / timed_seconds if timed_seconds else None,
        "mfu": peak.mfu(timed_tokens / timed_seconds * flops_per_token / env.world_size) if timed_seconds else None,
        "micro_batch_size": micro_batch,
        "grad_accum_steps": grad_accum,
        "wall_s": time.perf_counter() - started,  # this process, start to end: build, train, evals, checkpoints
        "dtype": dtype_name(env.compute_dtype),
        "compile": built.compiled,
        **strategy.loss_scale_stats(),
    }
    if not already_complete:  # a re-run that trained nothing adds nothing to the run's record
        metrics.log({"summary": summary})
    if env.is_main:
        print(format_summary(summary), flush=True)
    metrics.close()
    if guard.diverged:
        raise UserError(guard.message(state.step, checkpointer.latest(), t, low_precision=env.compute_dtype != torch.float32))
    if checkpointer.failure:  # the last save asked for (the final one) did not reach the disk
        newest = checkpointer.latest()
        raise UserError(f"{checkpointer.failure}; {'the newest checkpoint is ' + newest if newest else 'no checkpoint was saved'}: free space (or fix the write error) and run the same command to resume")
    if checkpointer.upload_failure:  # the machine may go away: the user must know the only copy is local
        raise UserError(
            f"the last checkpoint did not reach {checkpointer.remote.storage.location()} ({checkpointer.upload_failure}); "
            f"it is only on this machine: {checkpointer.latest()} (copy it off, or run the same command again to resume and upload)"
        )
    if checkpointer.remote and checkpointer.remote.where() and env.is_main:
        print(f"checkpoint uploaded to {checkpointer.remote.where()}", flush=True)
    if stop_reason and env.is_main:  # the last line on the screen
        print(f"stopping on {stop_reason} after step {state.step}: checkpoint saved; the same command resumes", flush=True)
    return summary


def format_summary(s: dict) -> str:
    """The run's last line: what was reached, and only the numbers this process measured."""
    measured = [
        f"train loss {s['train_loss']:.4f}" if s["train_loss"] is not None else "",
        f"val loss {s['val_loss']:.4f}" if s["val_loss"] is not None else "",
        f"{s['tokens_per_s']:,.0f} tok/s, MFU {100 * s['mfu']:.1f}%" if s["tokens_per_s"] is not None else "",
        f"{s['skipped_steps']} skipped steps" if s["skipped_steps"] else "",
        f"fp16 loss scale {s['loss_scale']:g}, {s['overflow_skips']} overflow skips" if "loss_scale" in s else "",
    ]
    batch = f"{s['strategy']}, micro-batch {s['micro_batch_size']} x grad-accum {s['grad_accum_steps']}"
    return " | ".join([f"done: step {s['step']}", *filter(None, measured), batch, s["run_dir"]])


def format_record(r: dict) -> str:
    memory = " | ".join(f"{k.removeprefix('mem_').removesuffix('_mb')} {v:,.0f} MB" for k, v in r.items() if k.startswith("mem_"))
    # fp16: overflow skips are the loss scaler finding its level (expected), not divergence
    scaling = f" | loss scale {r['loss_scale']:g} ({r['overflow_skips']} overflow skips)" if "loss_scale" in r else ""
    skipped = f" | SKIPPED: {r['skipped']} ({r['skipped_steps']} in this run)" if "skipped" in r else ""
    return (
        f"step {r['step']:6d} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | grad norm {r['grad_norm']:.3f} | "
        f"{r['ms_per_step']:.0f} ms | {r['tokens_per_s']:,.0f} tok/s | MFU {100 * r['mfu']:.1f}%{scaling} | {memory}{skipped}"
    )
