"""DeepSpeed ZeRO (stages 0-3, optional CPU offload) behind the same interface as the others.

The ds_config JSON says how to shard; dist_gpt's config says what to train. Values written "auto" in the JSON
are filled from our config (as Hugging Face's integration does), and a value that is written out must agree
with ours: two sources of truth for the batch size or the clipping would silently train something else.

DeepSpeed gets our own torch AdamW (from make_optimizer) and no scheduler: the trainer sets the learning rate
each step through set_lr, which writes the param groups that the ZeRO optimizers step with.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import logging
import math
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from dist_gpt.config import Config
from dist_gpt.errors import UserError
from dist_gpt.parallel.base import BatchShape, OptimizerFactory, Strategy, ensure_process_group
from dist_gpt.runtime.distributed import DistEnv, broadcast_from_main
from dist_gpt.runtime.precision import MIN_LOSS_SCALE, dtype_name

# ZeRO 1-3 call deprecated torch.distributed collectives hundreds of times per run; the warnings are DeepSpeed's
# business, not the user's. Filtered here (this module is imported only for the deepspeed strategy).
warnings.filterwarnings("ignore", category=FutureWarning, module=r"deepspeed(\.|$)")
warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.distributed.*")

SKIP_SHM_BUILD_ENV = "DIST_GPT_DS_SKIP_SHM_BUILD"  # =1: on CPU, use gloo instead of building DeepSpeed's shm comm op

# fp16 keys absent or "auto": DeepSpeed's dynamic loss scaling set up as torch's GradScaler is for the other
# strategies (start at 2^16, halve on every overflow, double after 2000 clean steps).
FP16_AUTO = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 2000, "hysteresis": 1, "min_loss_scale": 1}

# Keys whose meaning we own: "optimizer" and "scheduler" would replace our AdamW and our cosine schedule.
FORBIDDEN_SECTIONS = {
    "optimizer": "dist_gpt builds its own AdamW from train.lr/beta1/beta2/weight_decay",
    "scheduler": "the trainer sets the learning rate every step (train.lr, min_lr, warmup_steps)",
}


def load_ds_config(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"DeepSpeed config {path} does not exist: give one of ds_configs/zero{{0,1,2,3}}.json or zero3-offload.json")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"DeepSpeed config {path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise UserError(f"DeepSpeed config {path} must be a JSON object")
    return raw


def resolve_ds_config(raw: dict, config: Config, env: DistEnv, micro_batch_size: int, grad_accum_steps: int, source: str = "ds_config") -> dict:
    """Fill the "auto" values from our config; raise one UserError naming both values on any contradiction."""
    ds = copy.deepcopy(raw)
    world = env.world_size

    def fill(section: dict, key: str, ours, our_name: str, where: str = "") -> None:
        """section[key] = ours when absent or "auto"; else it must equal ours."""
        value = section.get(key, "auto")
        if value == "auto":
            section[key] = ours
        elif value != ours:
            raise UserError(
                f"{source} sets {where}{key}={json.dumps(value)} but dist_gpt's config gives {our_name}={json.dumps(ours)}: "
                f'set "{where}{key}": "auto" in {source} (or change the config to match)'
            )

    for key, why in FORBIDDEN_SECTIONS.items():
        if key in ds:
            raise UserError(f'{source} has an "{key}" section, but {why}: remove it from {source}')
    if env.compute_dtype == torch.float16 and env.device.type == "cpu":
        raise UserError("train.dtype=fp16 with DeepSpeed on cpu: DeepSpeed refuses fp16 on CPU; use train.dtype=fp32 or bf16 (or fp16 with parallel.strategy=ddp or fsdp)")
    # Absent counts as "auto": our dtype decides, so a bf16 or fp16 run never silently trains in fp32.
    for key, dtype in (("bfloat16" if "bfloat16" in ds else "bf16", torch.bfloat16), ("fp16", torch.float16)):
        fill(ds.setdefault(key, {}), "enabled", env.compute_dtype == dtype, f"{dtype_name(dtype)} (train.dtype={config.train.dtype} on {env.device.type})", where=f"{key}.")
    for key, value in FP16_AUTO.items():  # absent or "auto": as GradScaler (unused unless fp16 is enabled)
        if ds["fp16"].get(key, "auto") == "auto":
            ds["fp16"][key] = value

    fill(ds, "train_micro_batch_size_per_gpu", micro_batch_size, "train.micro_batch_size")
    fill(ds, "gradient_accumulation_steps", grad_accum_steps, f"grad-accum (train.global_batch_size / (micro-batch {micro_batch_size} x world {world}))")
    fill(ds, "train_batch_size", micro_batch_size * grad_accum_steps * world, "train.global_batch_size")
    fill(ds, "gradient_clipping", float(config.train.grad_clip), "train.grad_clip")

    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if zero.get("compute_grad_norm", True) is False:
        raise UserError(f"{source} sets zero_optimization.compute_grad_norm=false, but the gradient norm is what the log shows and what skips a non-finite step: remove it")
    stage = zero.get("stage", 0)
    # Micro-batch gradients summed in fp32, as DDP and FSDP do. Left alone, DeepSpeed accumulates in the model's
    # dtype: a 40-micro-batch bf16 sum has several times the error of one rounding. ZeRO-1, 2 and 3 take fp32
    # (ZeRO-1 through DeepSpeed's BF16_Optimizer, ZeRO-3 as its gradient partitions' buffer); stage 0 refuses
    # the mix (NotImplementedError), so it keeps the model's dtype (said in ds_configs/README.md).
    accum = "fp32" if stage in (1, 2, 3) else dtype_name(env.compute_dtype)
    fill(ds.setdefault("data_types", {}), "grad_accum_dtype", accum, f"{accum} gradient accumulation (ZeRO stage {stage}, train.dtype={config.train.dtype})", where="data_types.")
    hidden = config.model.n_embd
    # Hugging Face's rule of thumb for the bucket sizes, scaled to the model's width.
    for key, value in {
        "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
    }.items():
        if zero.get(key) == "auto":
            zero[key] = value
    if zero.get("offload_optimizer", {}).get("device", "none") != "none":
        # We always hand DeepSpeed a torch optimizer; DeepSpeed refuses that with offload unless told it's fine.
        if ds.get("zero_force_ds_cpu_optimizer", False):
            raise UserError(f'{source} sets "zero_force_ds_cpu_optimizer": true, but dist_gpt passes its own torch AdamW: set it to false')
        ds["zero_force_ds_cpu_optimizer"] = False
    ds.setdefault("steps_per_print", 1 << 30)  # the trainer logs; DeepSpeed's own progress lines are noise
    ds.setdefault("wall_clock_breakdown", False)

    leftover = _auto_keys(ds)
    if leftover:
        raise UserError(f'{source} leaves {leftover[0]} = "auto", which dist_gpt does not know how to fill: give it a value')
    return ds


def _auto_keys(node, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in _auto_keys(value, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if node == "auto" else []


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"
    # Its per-rank ZeRO partitions: [bf16_]zero_pp_rank_R_*; mp_rank_00_model_states.pt is rank 0's.
    RANK_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_")
    scales_fp16_loss_itself = True  # the engine's fp16 optimizer: its scale and skips travel in its own checkpoint

    def __init__(self, config: Config, env: DistEnv):
        super().__init__(config, env)
        self.engine = None  # the DeepSpeedEngine (the checkpointer uses engine.save_checkpoint / load_checkpoint)
        self.ds_config: dict | None = None  # with the "auto" values filled, once wrap knows the batch shape

    @functools.cached_property
    def raw_ds_config(self) -> dict:
        """The ds_config file as written (its "auto" values unfilled), read when first needed."""
        return load_ds_config(self.config.parallel.ds_config)

    @property
    def compiles_by_default(self) -> bool:
        # ZeRO-3's gather hooks on every parameter break compiled blocks into pieces: on CPU (2 ranks, tiny GPT)
        # its compiled steps were 2-3x slower than eager after a 29 s compile; stages 0-2 compile as the others.
        return self.raw_ds_config.get("zero_optimization", {}).get("stage", 0) < 3

    def wrap(self, model: nn.Module, make_optimizer: OptimizerFactory, batch: BatchShape) -> None:
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines (config dumps, timers) drown the log
        self.ds_config = resolve_ds_config(
            self.raw_ds_config, self.config, self.env, batch.micro_batch_size, batch.grad_accum_steps, source=self.config.parallel.ds_config
        )
        ensure_process_group(self.env, self.config.parallel.backend)  # DeepSpeed joins the group we made
        # DeepSpeed insists on these even when the group exists (a plain `python launch/train.py --ds_config`).
        for key, value in (("LOCAL_RANK", self.env.local_rank), ("RANK", self.env.rank), ("WORLD_SIZE", self.env.world_size)):
            os.environ.setdefault(key, str(value))
        if self.env.device.type == "cpu" and os.environ.get(SKIP_SHM_BUILD_ENV) == "1":
            # DeepSpeed compiles a shared-memory all-reduce op with g++ on first use on CPU (~1 min on 2 cores,
            # cached per machine). Plain gloo does the same job; the tests skip the build this way.
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        model = self.prepare_model(model, to_device=False)  # the engine moves (or partitions) it itself
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=make_optimizer(model), config=self.ds_config)
        self.engine = self.model = engine
        self.optimizer = optimizer  # a ZeRO wrapper around our AdamW; param_groups are the AdamW's (set_lr)
        self.unwrapped_model = engine.module

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # with bf16 or fp16 enabled the engine casts the parameters itself

    def forward_backward(self, x, y, loss_scale, sync_grads):
        # Our boundary, not DeepSpeed's micro-step counter, decides when gradients are reduced and applied.
        self.engine.set_gradient_accumulation_boundary(sync_grads)
        loss = self.engine(x, y)
        # loss_scale is already 1/grad-accum: scale_wrt_gas=False stops DeepSpeed dividing by it a second time.
        self.engine.backward(loss * loss_scale, scale_wrt_gas=False)
        if not sync_grads:
            self.engine.step()  # a micro-step: DeepSpeed counts it and applies nothing
        return loss.detach()

    def clip_and_step(self, max_norm: float) -> float:
        # Clipping happens inside the engine's step (ds_config gradient_clipping = train.grad_clip).
        if not hasattr(self.engine.optimizer, "_global_grad_norm"):
            # Stage 0 in fp32 steps our AdamW directly: it clips but keeps no norm. Its gradients are whole and
            # already averaged over ranks, so measure them before the step.
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            norm = float(torch.nn.utils.get_total_norm(grads))
            if math.isfinite(norm):
                self.engine.step()
            else:
                self.engine.zero_grad()
            return norm
        # The ZeRO optimizers (and DeepSpeed's bf16 one) skip a step whose norm is not finite themselves, drop
        # its gradients and report the norm as inf.
        self.engine.step()
        norm = self.engine.get_global_grad_norm()  # the ZeRO optimizers' pre-clipping norm
        return float(norm) if norm is not None else float("nan")

    def _loss_scale(self) -> float | None:
        """The engine's fp16 loss scale (None without fp16): FP16_Optimizer (stage 0) keeps it in
        loss_scale_config, the ZeRO optimizers as cur_scale."""
        if not self.ds_config["fp16"]["enabled"]:
            return None
        optimizer = self.engine.optimizer
        return float(optimizer.loss_scale_config.cur_scale if hasattr(optimizer, "loss_scale_config") else optimizer.cur_scale)

    def skipped_for_overflow(self) -> bool:
        scale = self._loss_scale()
        return scale is not None and scale > MIN_LOSS_SCALE

    def loss_scale_stats(self) -> dict[str, float]:
        scale = self._loss_scale()
        return {} if scale is None else {"loss_scale": scale, "overflow_skips": int(self.engine.skipped_steps)}

    def set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    # ------------------------------------------------------------------ checkpointing

    def save_checkpoint(self, path: Path, async_save: bool = False) -> None:
        """DeepSpeed's own format (ZeRO shards its optimizer state in flat partitions DCP cannot describe):
        engine.save_checkpoint(dir, tag) writes into dir/tag, so the files land directly in `path`.
        Always synchronous. The files are per-rank and tied to this world size (ZeRO partitions)."""
        self.engine.save_checkpoint(str(path.parent), tag=path.name, save_latest=False)
        return None

    def load_checkpoint(self, path: Path, manifest: dict) -> None:
        saved_by, saved_world = manifest.get("strategy"), manifest.get("world_size")
        if saved_by != self.name:
            raise UserError(f"{path} was saved by strategy {saved_by}; a deepspeed run can only resume DeepSpeed checkpoints: resume it with parallel.strategy={saved_by}")
        load_dir, tag = path.parent, path.name
        if saved_world != self.env.world_size:
            # ZeRO partitions are tied to the world size; DeepSpeed's universal checkpoint (one file per
            # parameter and optimizer moment) is not. Rank 0 converts, every rank loads the conversion.
            converted = self._to_universal(path, saved_world)
            load_dir, tag = converted.parent, converted.name
        # Our learning rate comes from the schedule (set_lr every step); DeepSpeed has no scheduler to restore.
        universal = self.engine._config.load_universal_checkpoint
        self.engine._config.load_universal_checkpoint = tag != path.name
        try:
            load_path, _ = self.engine.load_checkpoint(str(load_dir), tag=tag, load_lr_scheduler_states=False)
        finally:
            self.engine._config.load_universal_checkpoint = universal
            if tag != path.name:
                self._barrier()  # every rank has read the conversion
                if self.env.is_main:
                    shutil.rmtree(load_dir / tag, ignore_errors=True)
                    (load_dir / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's pointer
        if load_path is None:
            raise UserError(f"DeepSpeed could not load a checkpoint from {path}")

    @classmethod
    def consolidated_model_state(cls, ckpt_dir: Path, config: Config) -> dict[str, torch.Tensor]:
        return consolidated_model_state(ckpt_dir)

    def _barrier(self) -> None:
        if self.env.distributed:
            import torch.distributed as dist

            dist.barrier()

    def _to_universal(self, path: Path, saved_world) -> Path:
        """Convert `path` (saved by saved_world ranks) to a universal checkpoint in this run's checkpoints/
        step_N.universal.tmp (the source may be read-only; removed once loaded, else by the next save as any
        stale step_*.tmp) and return that directory."""
        import subprocess
        import sys

        import torch.distributed as dist

        cannot = f"{path} was saved by {saved_world} DeepSpeed ranks, this run has {self.env.world_size}"
        fallback = (
            f"resume with {saved_world} processes, or carry the weights over: python -m dist_gpt.export {path} --out weights.safetensors, "
            f"then start a new run with model.init_from=weights.safetensors (the optimizer moments and the data position restart)"
        )
        if self.engine.zero_optimization_stage() == 0:
            raise UserError(f"{cannot}, and ZeRO stage 0 has no universal-checkpoint conversion: {fallback}")
        out = self.config.run_dir / "checkpoints" / f"{path.name}.universal.tmp"
        error = ""
        if self.env.is_main:
            shutil.rmtree(out, ignore_errors=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            print(f"{cannot}: converting it to a universal checkpoint in {out}", flush=True)
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path), "--output_folder", str(out),
                   "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"]  # fmt: skip
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
                if proc.returncode != 0:
                    error = (proc.stderr.strip().splitlines() or ["exit status %d" % proc.returncode])[-1]
            except (OSError, subprocess.TimeoutExpired) as e:
                error = str(e)
        error = broadcast_from_main(error)
        if error:
            raise UserError(f"{cannot}, and DeepSpeed's universal-checkpoint conversion failed ({error}): {fallback}")
        return out


# ------------------------------------------------------------------------------ consolidation

# Rank 0's model states (the module: stage 0's whole weights; the ds_config): ZeRO-3 names it per rank.
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
_WRAPPER_PREFIXES = re.compile(r"(_orig_mod\.|_checkpoint_wrapped_module\.|_fsdp_wrapped_module\.)")


def consolidated_model_state(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a DeepSpeed checkpoint (any ZeRO stage, any world size), in one process with no
    process group, under our GPT's keys (the tied lm_head.weight included, as GPT.load_state_dict expects).

    Stages 1-3 go through DeepSpeed's zero_to_fp32 (the fp32 master partitions of every rank, stitched);
    stage 0 keeps the whole module in mp_rank_00_model_states.pt. DeepSpeed's files are pickles, read with
    torch.load(weights_only=False) by DeepSpeed itself: consolidate only checkpoints you trust."""
    ckpt_dir = Path(ckpt_dir)
    model_states = next((ckpt_dir / name for name in MODEL_STATES if (ckpt_dir / name).is_file()), None)
    if model_states is None:
        raise UserError(f"{ckpt_dir} has no {MODEL_STATES[0]}: not a DeepSpeed checkpoint (or an incomplete one); give another step_* directory")
    saved = torch.load(model_states, map_location="cpu", weights_only=False)  # DeepSpeed's pickle (see above)
    stage = int(saved.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
    if stage == 0:
        state = {k: v.float() for k, v in saved["module"].items()}
        for alias, source in saved.get("shared_params", {}).items():
            state.setdefault(alias, state[source])
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()):  # its progress lines would mix into `sample`'s text
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)
    return {_WRAPPER_PREFIXES.sub("", k): v for k, v in state.items()}
