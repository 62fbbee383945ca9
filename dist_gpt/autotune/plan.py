"""Which strategy fits N GPUs of M GB, before renting them:

    python -m dist_gpt.plan --config gpt2-124m-owt --gpus 8 --gpu-memory-gb 24 [--dtype bf16|fp16|fp32]
        [--device cuda|cpu] [--gpus-per-node 8] [--no-offload] [--json] [section.key=value ...]

For every strategy and option (DDP, ZeRO-1/2/3, FSDP with and without resharding, CPU offload through FSDP
or ZeRO-3, each with and without activation checkpointing) it prints the predicted memory per GPU split into
parameters / gradients / optimizer states / activations, the largest micro-batch that fits, the micro-batch
and grad-accum that keep the config's global batch, and one command to paste. Nothing is run: the numbers
are dist_gpt.autotune.memory's model (the one the autotuner starts its search from), with the autotuner's convention
for what fits: the predicted peak at most the GPU's memory less train.memory_headroom (8% by default).

Which plan is recommended (the fastest that fits, as far as a model without measurements can tell):
1. CPU offload only when nothing fits without it: the optimizer step runs on the CPU and the parameters
   cross PCIe every micro-batch, slower than anything else here.
2. The rest in order of cost: without activation checkpointing before with it (it recomputes each block's
   forward: ~1/3 more compute); then by communication per step and moving parts: DDP (one all-reduce of the
   gradients), ZeRO-1, ZeRO-2 (the same volume as reduce-scatter + all-gather, states sharded), FSDP without
   resharding (gathers each block once), FSDP and ZeRO-3 (gather twice: 1.5x the volume).
3. The first in that order whose micro-batch is comparable to the largest any option reaches wins:
   at least half of it, or at least SATURATING_TOKENS tokens. The global batch is the same either way, so the
   micro-batch only changes how large each kernel is and how often offloaded parameters travel; a factor
   of 2 rarely pays for more traffic or recomputation, and past ~16k tokens a larger one buys little.
When nothing fits it says so and computes what would: the fewest GPUs, GPUs with more memory, a shorter
block_size. The predictions are checked against measured peaks on CPU (tests/test_plan.py) and can be on a
GPU with benchmarks/plan_vs_measured.py.
"""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass, field

from dist_gpt.autotune import memory
from dist_gpt.config import CHOICES, Config, load_config
from dist_gpt.errors import UserError
from dist_gpt.runtime.precision import cpu_has_native_bf16

MB, GB = memory.MB, memory.GB
MAX_GPUS = 1024  # how far "the fewest GPUs that fit" looks
MIN_BLOCK = 64  # the shortest block_size worth suggesting
# A micro-batch of this many tokens keeps a GPU's matmuls large (the seed's single-GPU run: 12 x 1024); an
# assumption of the rule above, not a measurement.
SATURATING_TOKENS = 16384


@dataclass(frozen=True)
class Option:
    """One way to run: a strategy of dist_gpt.autotune.memory, offload and checkpointing, and the config it needs."""

    name: str
    memory_strategy: str  # dist_gpt.autotune.memory's name ("ddp" means "single" on one GPU)
    offload: bool = False
    checkpointing: bool = False
    settings: tuple = ()  # (config key, value) pairs this option needs
    ds_config: str = ""  # launched with `deepspeed --ds_config ...`

    @property
    def label(self) -> str:
        return self.name + (" +ckpt" if self.checkpointing else "")


def _fsdp(name: str, reshard: bool, offload: bool) -> Option:
    settings = (("parallel.strategy", "fsdp"), ("parallel.fsdp_reshard_after_forward", reshard), ("parallel.fsdp_cpu_offload", offload))
    return Option(name, "fsdp" if reshard else "fsdp-no-reshard", offload, settings=settings)


def _zero(stage: int, offload: bool = False) -> Option:
    name = f"zero{stage}" + ("-offload" if offload else "")
    return Option(name, f"zero{stage}", offload, ds_config=f"ds_configs/{name}.json")


# Rule 2 of the docstring: the order within a tier.
STRATEGY_ORDER = (
    Option("ddp", "ddp", settings=(("parallel.strategy", "ddp"),)),
    _zero(1), _zero(2), _fsdp("fsdp-no-reshard", False, False), _fsdp("fsdp", True, False), _zero(3),
    _fsdp("fsdp-offload", True, True), _zero(3, offload=True),
)
TIERS = ((False, False), (False, True), (True, False), (True, True))  # (offload, checkpointing), rules 1 and 2
OPTIONS = tuple(dataclasses.replace(o, checkpointing=ac) for offload, ac in TIERS for o in STRATEGY_ORDER if o.offload == offload)


@dataclass(frozen=True)
class Request:
    config_name: str
    overrides: tuple = ()
    gpus: int = 1
    gpu_memory_gb: float = 24.0
    dtype: str = ""  # bf16 | fp16 | fp32; "" = the config's, else bf16 on GPU / fp32 on CPU
    device: str = "cuda"
    gpus_per_node: int = 8
    allow_offload: bool = True

    def config(self) -> Config:
        return load_config(self.config_name, list(self.overrides))

    def with_overrides(self, *extra: str) -> Request:
        return dataclasses.replace(self, overrides=(*self.overrides, *extra))


def resolve_dtype(request: Request, config: Config) -> str:
    """--dtype, else the config's train.dtype; auto as training resolves it: bf16 on a GPU (one with native bf16 is
    assumed: the planner rents), on a CPU bf16 where this one has it natively, else fp32."""
    auto = "bf16" if request.device == "cuda" or cpu_has_native_bf16() else "fp32"
    dtype = request.dtype or (config.train.dtype if config.train.dtype != "auto" else auto)
    if dtype not in CHOICES[("train", "dtype")]:
        trains = ", ".join(c for c in CHOICES[("train", "dtype")] if c != "auto")
        raise UserError(f"dtype {dtype}: this version of dist_gpt trains in {trains} only (train.dtype); plan with --dtype bf16 (the same bytes)")
    return dtype


def limit_bytes(request: Request, config: Config) -> float:
    """The autotuner's convention: the budget less train.memory_headroom."""
    return request.gpu_memory_gb * GB * (1 - config.train.memory_headroom)


def predict(request: Request, config: Config, option: Option, micro_batch: int, grad_accum: int = 1) -> memory.Breakdown:
    """The memory model's peak on one GPU for this option at this micro-batch (what every row shows)."""
    return memory.predict(config.model.gpt_config(), micro_batch, **_model_args(request, config, option), grad_accum=grad_accum)


def _model_args(request: Request, config: Config, option: Option) -> dict:
    """dist_gpt.memory.predict's arguments for this option, after the shape and the micro-batch."""
    strategy = "single" if option.memory_strategy == "ddp" and request.gpus == 1 else option.memory_strategy
    dtype = "bf16" if resolve_dtype(request, config) in ("bf16", "fp16") else "fp32"  # fp16 keeps the same bytes as bf16
    return dict(strategy=strategy, world_size=request.gpus, dtype=dtype, activation_checkpointing=option.checkpointing,
                offload=option.offload, device=request.device)


def global_batch(request: Request, config: Config) -> tuple[int, str]:
    """(the global batch to keep, a note). 0 = none set: micro-batch x GPUs. One not divisible by the GPU count
    cannot be kept by any micro-batch: the nearest multiple is planned instead, and said so."""
    wanted = config.train.global_batch_size
    if not wanted:
        return 0, "train.global_batch_size=0: the global batch is micro-batch x GPUs"
    if wanted % request.gpus == 0:
        return wanted, f"global batch {wanted} = {wanted // request.gpus} sequences per GPU per step"
    nearest = max(request.gpus, round(wanted / request.gpus) * request.gpus)
    return nearest, (f"global batch {wanted} is not reachable on {request.gpus} GPUs (not divisible): planned with "
                     f"train.global_batch_size={nearest}, the nearest multiple of {request.gpus}")


@dataclass
class Row:
    option: Option
    largest: int  # the largest micro-batch that fits (0: not even 1)
    micro_batch: int  # the plan's: the largest fitting one that keeps the global batch (0: none)
    grad_accum: int
    memory: memory.Breakdown  # at micro_batch (else at largest, else at 1)
    unavailable: str = ""  # why this option cannot run at all here

    @property
    def fits(self) -> bool:
        return self.micro_batch > 0 and not self.unavailable


def unavailable(request: Request, config: Config, option: Option) -> str:
    """Why this option cannot run here at all ("" when it can)."""
    if option.offload and request.device == "cpu":
        return "offload to the CPU from the CPU frees nothing"
    if option.offload and not request.allow_offload:
        return "no offload asked (--no-offload)"
    if option.memory_strategy.startswith("fsdp") and config.model.vocab_size % request.gpus:
        return f"FSDP needs model.vocab_size divisible by {request.gpus}"
    return ""


def evaluate(request: Request, config: Config, option: Option, batch: int) -> Row:
    limit = limit_bytes(request, config)
    if why := unavailable(request, config, option):
        return Row(option, 0, 0, 0, predict(request, config, option, 1), why)
    # with gradient accumulation the gradients stay alive through the next micro-batch's forward (the autotuner's 2)
    largest = memory.largest_fitting(limit, config.model.gpt_config(), **_model_args(request, config, option), grad_accum=2 if batch else 1)
    micro_batch, grad_accum = largest, 1
    if batch:  # the largest divisor of the per-GPU batch that fits with its own grad-accum
        per_gpu = batch // request.gpus
        sizes = [d for d in range(per_gpu, 0, -1) if per_gpu % d == 0]
        micro_batch = next((d for d in sizes if predict(request, config, option, d, per_gpu // d).total <= limit), 0)
        grad_accum = per_gpu // micro_batch if micro_batch else 0
        largest = max(largest, micro_batch)
    shown = micro_batch or largest or 1
    return Row(option, largest, micro_batch, grad_accum, predict(request, config, option, shown, grad_accum or 1))


def choose(rows: list[Row], block_size: int) -> tuple[Row | None, str]:
    """The docstring's rule. Rows come in OPTIONS order, which is the order of cost within each offload level."""
    for offload in (False, True):
        fitting = [r for r in rows if r.fits and r.option.offload == offload]
        if not fitting:
            continue
        best = max(r.micro_batch for r in fitting)
        pick = next(r for r in fitting if 2 * r.micro_batch >= best or r.micro_batch * block_size >= SATURATING_TOKENS)
        largest = max(fitting, key=lambda r: r.micro_batch)
        why = ("nothing fits without CPU offload; " if offload else "") + "the first in order of cost whose micro-batch is comparable"
        why += f" to the largest any option reaches ({largest.micro_batch}, {largest.option.label}): at least half, or {SATURATING_TOKENS:,} tokens"
        cheaper = [f"{r.option.label} {r.micro_batch}" for r in fitting[:fitting.index(pick)]]
        if cheaper:
            why += f"; cheaper ones fit only {', '.join(cheaper)}"
        return pick, why
    return None, ""


def command(request: Request, config: Config, row: Row, batch: int) -> str:
    """The exact launch line: the user's overrides, then what this option and micro-batch change."""
    option = row.option
    settings = option_settings(option, request.gpus)
    dtype = resolve_dtype(request, config)
    if dtype != config.train.dtype and (config.train.dtype != "auto" or request.dtype):
        settings["train.dtype"] = dtype
    if request.device == "cpu" and config.train.device != "cpu":
        settings["train.device"] = "cpu"
    if batch != config.train.global_batch_size:
        settings["train.global_batch_size"] = batch
    always = {"parallel.strategy", "train.micro_batch_size"}
    changed = {k: v for k, v in settings.items() if k in always or _value(config, k) != v}
    changed["train.micro_batch_size"] = row.micro_batch
    last = {o.partition("=")[0].strip(): o for o in request.overrides}  # a key given twice: the last one holds
    kept = [o for key, o in last.items() if key not in changed]
    args = ["launch/train.py"] + (["--ds_config", option.ds_config] if option.ds_config else []) + ["--config", request.config_name]
    args += kept + [override(k, v) for k, v in changed.items()]
    n, per_node = request.gpus, request.gpus_per_node
    if n > per_node and option.ds_config:  # DeepSpeed's launcher: a hostfile with one "nodeI slots=<per node>" line per node
        return shlex.join(["deepspeed", "--hostfile", "hostfile"] + args)
    # launch/train.py starts the processes itself (torchrun's options; dist_gpt/runtime/launcher.py); across nodes, run it on each
    launch = [] if n == 1 else [f"--nproc_per_node={n}"] if n <= per_node else [
        f"--nnodes={n // per_node}", f"--nproc_per_node={per_node}", "--rdzv-endpoint=NODE0:29400", "--rdzv-id=run"]
    return shlex.join(["python", args[0], *launch, *args[1:]])


def option_settings(option: Option, gpus: int) -> dict:
    """The config values this option runs with (DeepSpeed's also come from --ds_config on the launch line)."""
    settings = dict(option.settings)
    if option.ds_config:
        settings["parallel.strategy"] = "deepspeed"
    elif gpus == 1 and option.memory_strategy == "ddp":
        settings["parallel.strategy"] = "single"
    settings["parallel.activation_checkpointing"] = option.checkpointing
    return settings


def override(key: str, value) -> str:
    return f"{key}={str(value).lower() if isinstance(value, bool) else value}"


def _value(config: Config, key: str):
    section, _, leaf = key.partition(".")
    return getattr(getattr(config, section), leaf)


@dataclass
class Plan:
    request: Request
    config: Config
    dtype: str
    limit: float
    batch: int  # the global batch planned (0: micro-batch x GPUs)
    batch_note: str
    rows: list[Row]
    recommended: Row | None
    why: str
    command: str = ""
    alternatives: list[tuple[str, str]] = field(default_factory=list)  # (what would fit, its command): when nothing fits, or only with offload


def plan(request: Request, look_further: bool = True) -> Plan:
    if request.gpus < 1:
        raise UserError(f"--gpus {request.gpus} must be at least 1")
    if request.gpu_memory_gb <= 0:
        raise UserError(f"--gpu-memory-gb {request.gpu_memory_gb:g} must be positive (the memory of one GPU, e.g. 24 for an L4, 80 for an H100)")
    if request.gpus_per_node < 1:
        raise UserError(f"--gpus-per-node {request.gpus_per_node} must be at least 1")
    if request.device not in ("cuda", "cpu"):
        raise UserError(f"--device {request.device} is not one of cuda, cpu")
    config = request.config()
    batch, note = global_batch(request, config)
    rows = [evaluate(request, config, option, batch) for option in OPTIONS]
    pick, why = choose(rows, config.model.block_size)
    result = Plan(request, config, resolve_dtype(request, config), limit_bytes(request, config), batch, note, rows, pick, why)
    if pick:
        result.command = command(request, config, pick, batch or pick.micro_batch * request.gpus)
    if look_further and (not pick or pick.option.offload):  # offload is the slow way out: say what would fit without it
        result.alternatives = what_would_fit(dataclasses.replace(request, allow_offload=request.allow_offload and not pick), config)
    return result


def what_would_fit(request: Request, config: Config) -> list[tuple[str, str]]:
    """Computed ways out, in order: more GPUs (same model, same batch), GPUs with more memory, a shorter block."""
    found = []
    counts = [n for n in range(request.gpus + 1, MAX_GPUS + 1) if n <= request.gpus_per_node or n % request.gpus_per_node == 0]
    for n in counts:  # cheap test first (micro-batch 1 fits somewhere), then the full plan
        more = dataclasses.replace(request, gpus=n)
        if any(predict(more, config, o, 1, 2).total <= limit_bytes(more, config) for o in OPTIONS if not unavailable(more, config, o)):
            p = plan(more, look_further=False)
            if p.recommended:
                found.append((f"{n} GPUs of {request.gpu_memory_gb:g} GB: {p.recommended.option.label}, micro-batch {p.recommended.micro_batch}", p.command))
                break
    else:
        found.append((f"no number of GPUs up to {MAX_GPUS}: one sequence's activations alone exceed the limit", ""))
    need = min(predict(request, config, o, 1, 2).total for o in OPTIONS if not unavailable(request, config, o))
    gb = need / (1 - config.train.memory_headroom) / GB
    found.append((f"GPUs with at least {gb:.1f} GB each (micro-batch 1)", ""))
    block = config.model.block_size // 2
    while block >= MIN_BLOCK:
        shorter = request.with_overrides(f"model.block_size={block}")
        p = plan(shorter, look_further=False)
        if p.recommended:
            found.append((f"model.block_size={block} (a shorter context: a different model) with {p.recommended.option.label}, micro-batch {p.recommended.micro_batch}", p.command))
            break
        block //= 2
    else:
        found.append((f"no block_size down to {MIN_BLOCK}: the model's states alone exceed the limit", ""))
    return found


# ------------------------------------------------------------------------------------------ output
