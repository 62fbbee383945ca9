"""The run configuration: dataclasses filled from a YAML preset plus dotted command-line overrides.

This is the only module that knows the schema. Everything is checked here, once, at the door: an unknown key,
a wrong type or an impossible value is a UserError with one line that says what to change. Checks that need
the runtime (world size, the data's length) live in `check_runtime`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from dist_gpt.errors import UserError
from dist_gpt.model import CUDA_ONLY_BACKENDS, PRESETS, GPTConfig

DTYPES = ("fp32", "bf16", "fp16")  # train.dtype besides auto; runtime/precision.py maps them to torch dtypes
STRATEGIES = ("single", "ddp", "fsdp", "deepspeed")  # parallel.strategy besides auto; one module each in parallel/


@dataclass
class ModelSection(GPTConfig):
    preset: str = ""  # a name from dist_gpt.model.PRESETS; its shape is the base the other keys override
    init_from: str = "scratch"  # scratch | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | a local HF GPT-2 dir | an export (.safetensors, or an `export --hf` dir) | a run's checkpoint (run, checkpoints/ or step_N dir)

    def gpt_config(self) -> GPTConfig:
        return GPTConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(GPTConfig)})


@dataclass
class DataSection:
    dataset: str = "bible-es"  # bible-es | local files (path or glob of .txt/.jsonl/.parquet) | hf:NAME[:CONFIG] (a Hugging Face dataset, and its config name)
    dir: str = ""  # where train.bin / val.bin / meta.json live; default data/<dataset name>
    val_fraction: float = 0.01  # of documents, chosen deterministically
    text_field: str = "text"  # the column holding text in jsonl/parquet/HF data
    hf_split: str = "train"  # the split of an hf: dataset to read
    num_proc: int = 0  # tokenizer processes; 0 = one per core
    max_tokens: int = 0  # stop preparing after this many tokens (train + val, whole documents); 0 = the whole dataset


@dataclass
class TrainSection:
    micro_batch_size: int | str = 8  # sequences per device per forward, or "auto" (the autotuner picks)
    global_batch_size: int = 0  # sequences per optimizer step over all ranks; 0 = micro_batch_size x world size
    memory_budget_gb: float = 0.0  # for micro_batch_size auto: memory per rank to fill; 0 = the device's (whole GPU / available RAM)
    memory_headroom: float = 0.08  # for micro_batch_size auto: fraction of the budget kept free
    max_steps: int = 100  # optimizer steps of the whole run (a resumed run continues to it)
    lr: float = 6e-4  # peak learning rate, after warmup
    min_lr: float = 6e-5  # the cosine ends here
    warmup_steps: int = 10  # linear warmup from 0 to lr
    lr_decay_steps: int = 0  # 0 = max_steps
    weight_decay: float = 0.1  # AdamW, on matrices only (not biases, norms)
    beta1: float = 0.9  # AdamW
    beta2: float = 0.95  # AdamW
    grad_clip: float = 1.0  # 0 = off
    eval_every: int = 50  # steps; 0 = only at the end
    eval_batches: int = 10  # micro-batches of validation windows per eval
    seed: int = 1337  # weights, data order and dropout
    device: str = "auto"  # auto (cuda > mps > cpu) | cuda | mps | cpu
    dtype: str = "auto"  # auto (bf16 on GPUs and CPUs with native bf16, fp16 + loss scaling on older GPUs, fp32 on other CPUs) | fp32 | bf16 | fp16
    peak_tflops: float = 0.0  # MFU's yardstick per device; 0 = the GPU's data sheet, or on CPU measured once per machine
    compile: bool | str = "auto"  # torch.compile each block (faster steps after a one-off compile): auto (on for CUDA, off elsewhere) | true | false
    out_dir: str = "out"  # runs live in out_dir/run_name
    run_name: str = ""  # default: the config's name; the run lives in out_dir/run_name
    time_limit: str | float = ""  # e.g. 3h30m, 90m, 2:30:00, or minutes: save and exit 0 before it ends (also $DIST_GPT_TIME_LIMIT)
    max_skipped_steps: int = 5  # stop (exit != 0) after this many non-finite steps in a row; 0 = never
    eval_tasks: list[str] = field(default_factory=list)  # benchmarks scored during training: [] or [hellaswag]
    eval_task_every: int = 0  # steps between task evals; 0 = only at the end
    eval_task_limit: int = 0  # items per task eval (the first N of the file); 0 = all (HellaSwag: 10,042)
    eval_task_data: str = ""  # a local copy of the task's file (hellaswag_val.jsonl); default: downloaded once into ~/.cache/dist_gpt


@dataclass
class ParallelSection:
    strategy: str = "auto"  # auto | single | ddp | fsdp | deepspeed
    ds_config: str = ""  # DeepSpeed JSON (ds_configs/zero2.json, ...); set by `deepspeed ... --ds_config`
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    fsdp_reshard_after_forward: bool = True  # True: ZeRO-3-like; False: ZeRO-2-like (keeps params gathered)
    fsdp_cpu_offload: bool = False  # FSDP keeps parameters, gradients and optimizer state in CPU memory
    activation_checkpointing: bool = False  # recompute each block in backward


@dataclass
class LoggingSection:
    log_every: int = 10  # steps between log lines (and metrics.jsonl records)
    wandb: str = "off"  # off | offline | online
    wandb_project: str = "dist_gpt"  # the wandb project runs are logged to


@dataclass
class CheckpointSection:
    every_steps: int = 0  # 0 = only at the end (and on SIGTERM/SIGUSR1/Ctrl-C)
    every_minutes: float = 0.0  # wall-clock cadence; 0 = off
    keep_last_k: int = 3  # complete checkpoints kept; older ones are deleted after a new one is published
    resume: str = "auto"  # auto | never | PATH
    async_save: bool = False  # write checkpoints in the background while training goes on
    remote: str = ""  # a URL (s3://bucket/prefix, gs://..., az://..., file:///mnt/drive): every checkpoint is also uploaded there, under <run name>/; '' = off
    remote_wait_minutes: float = 10.0  # how long the end of a run waits for its last upload (never past train.time_limit)
    allow_other_data: bool = False  # resume although the prepared data differ from those the checkpoint recorded


@dataclass
class Config:
    name: str = "custom"  # the config's name (a preset's file name); the run dir is out_dir/(run_name or name)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    micro_batch_before_auto = None  # not a key (no annotation): set by load_config (see there), read by dist_gpt.train.run

    @property
    def run_dir(self) -> Path:
        return Path(self.train.out_dir) / (self.train.run_name or self.name)

    @property
    def data_dir(self) -> Path:
        return Path(self.data.dir or Path("data") / dataset_slug(self.data.dataset))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {name: cls for name, cls in typing.get_type_hints(Config).items() if name != "name"}
CHOICES = {
    ("model", "position"): ("rope", "learned"),
    ("model", "loss"): ("chunked", "plain"),
    ("train", "device"): ("auto", "cuda", "mps", "cpu"),
    ("train", "dtype"): ("auto", *DTYPES),
    ("parallel", "strategy"): ("auto", *STRATEGIES),
    ("parallel", "backend"): ("auto", "nccl", "gloo"),
    ("logging", "wandb"): ("off", "offline", "online"),
    ("train", "eval_tasks"): ("hellaswag",),  # each item of the list; a task is a module of dist_gpt/eval/
}


def dataset_slug(dataset: str) -> str:
    """A folder name for a dataset spec: 'hf:Skylion007/openwebtext' -> 'openwebtext', 'books/*.txt' -> 'books'."""
    name = dataset.removeprefix("hf:").rstrip("/")
    for part in reversed(name.replace("\\", "/").split("/")):
        stem = part.split("*")[0].split(".")[0]
        if stem:
            return stem
    return "dataset"


# ------------------------------------------------------------------------------------------ durations


_UNITS = re.compile(r"(?:(\d+(?:\.\d+)?)d)?(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")
_CLOCK = re.compile(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)")  # [D-][H:]M:S, as SLURM prints remaining time


def parse_time_limit(value: str | float | int | None, source: str = "train.time_limit") -> float | None:
    """Seconds from '3h30m', '90m', '45s', '1d2h', '2:30:00' ([D-][H:]M:S) or a number of minutes; None for
    no limit ('', 0). A value that is none of these is a UserError naming `source`."""
    if value is None or isinstance(value, bool):
        return None
    text = str(value).strip().lower().replace(" ", "")
    if not text:
        return None
    try:
        seconds = float(text) * 60
    except ValueError:
        units, clock = _UNITS.fullmatch(text), _CLOCK.fullmatch(text)
        if units and any(units.groups()):
            days, hours, minutes, secs = (float(g or 0) for g in units.groups())
        elif clock:
            days, hours, minutes, secs = (float(g or 0) for g in clock.groups())
        else:
            raise UserError(f"{source}={value!r} is not a duration: write e.g. 3h30m, 90m, 45s, 2:30:00, or a number of minutes") from None
        seconds = ((days * 24 + hours) * 60 + minutes) * 60 + secs
    if not math.isfinite(seconds) or seconds < 0:
        raise UserError(f"{source}={value!r} must be a positive duration (0 or empty: no limit)")
    return seconds or None


# ------------------------------------------------------------------------------------------ loading


def preset_names() -> list[str]:
    return sorted(p.stem for p in resources.files("dist_gpt.configs").iterdir() if p.name.endswith(".yaml"))


def load_config(name_or_path: str, overrides: list[str] = ()) -> Config:
    """A preset name (dist_gpt/configs/NAME.yaml) or a YAML path, then `section.key=value` overrides."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise UserError(f"config file {path} does not exist: give a preset ({', '.join(preset_names())}) or a YAML path")
        text, name = path.read_text(), path.stem
    else:
        resource = resources.files("dist_gpt.configs") / f"{name_or_path}.yaml"
        if not resource.is_file():
            raise UserError(f"no config preset named {name_or_path!r}: choose one of {', '.join(preset_names())}, or give a .yaml path")
        text, name = resource.read_text(), name_or_path
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)  # where the parser stopped: the line to look at
        where = f"{name_or_path}:{mark.line + 1}:{mark.column + 1}" if mark else name_or_path
        raise UserError(f"{where}: not valid YAML: {getattr(e, 'problem', None) or str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):  # an empty file (None) would train the defaults (GPT-2 124M) without a word
        raise UserError(f"{name_or_path} is empty: write the sections to change (see --print-config), or give a preset ({', '.join(preset_names())})"
                        if raw is None else f"{name_or_path} must be a mapping of sections ({', '.join(SECTIONS)})")
    raw.setdefault("name", name)
    before = (raw.get("train") if isinstance(raw.get("train"), dict) else {}).get("micro_batch_size", TrainSection.micro_batch_size)
    for item in overrides:
        _apply_override(raw, item)
    config = from_dict(raw)
    # global_batch_size 0 means micro-batch x world: `micro_batch_size=auto` over a number keeps that number's
    # global batch (dist_gpt.train.run resolves it with the world size, before the autotuner runs)
    if config.train.micro_batch_size == "auto" and not config.train.global_batch_size and type(before) is int:
        config.micro_batch_before_auto = before
    return config


def _apply_override(raw: dict, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or "." not in key:
        raise UserError(f"override {item!r} is not of the form section.key=value (e.g. train.max_steps=200)")
    section, _, leaf = key.strip().partition(".")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    if isinstance(parsed, int) and ":" in value:
        parsed = value  # YAML 1.1 reads 2:30:00 as the base-60 number 9000; a clock time is meant (train.time_limit)
    target = raw.setdefault(section, {})
    if not isinstance(target, dict):
        raise UserError(f"override {item!r}: {section!r} is not a section")
    target[leaf] = parsed


def from_dict(raw: dict) -> Config:
    raw = dict(raw)
    name = str(raw.pop("name", "custom"))
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise UserError(f"unknown config section {sorted(unknown)[0]!r}: the sections are {', '.join(SECTIONS)}")
    sections = {}
    for section, cls in SECTIONS.items():
        values = raw.get(section) or {}
        if not isinstance(values, dict):
            raise UserError(f"config section {section!r} must be a mapping of keys")
        if section == "model":
            values = _expand_model_preset(values)
        sections[section] = _build_section(section, cls, values)
    config = Config(name=name, **sections)
    check(config)
    return config


def _expand_model_preset(values: dict) -> dict:
    name = values.get("preset") or ""
    if name and name not in PRESETS:
        raise UserError(f"model.preset={name!r} is unknown: choose one of {', '.join(PRESETS)}")
    return {**PRESETS.get(name, {}), **values}


def _build_section(section: str, cls: type, values: dict):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            near = "".join(f"; did you mean {section}.{k}?" for k in difflib.get_close_matches(str(key), hints, n=1))
            raise UserError(f"unknown key {section}.{key}: the keys of {section} are {', '.join(hints)}{near}")
        kwargs[key] = _coerce(f"{section}.{key}", value, hints[key])
    return cls(**kwargs)


def _coerce(key: str, value, hint):
    if typing.get_origin(hint) is list:  # names: a YAML list, or one name or "a,b" (a command-line override)
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, list) and all(isinstance(v, str) for v in items):
            return [v.strip() for v in items if v.strip()]
        raise UserError(f"{key} must be a list of names (e.g. [hellaswag]), got {value!r}")
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if isinstance(value, bool) and bool not in allowed:
        raise UserError(f"{key} must be {_type_names(allowed)}, got {value!r}")
    for kind in allowed:
        if kind is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                return float(value)  # a string too: YAML 1.1 reads "1e-3" (no dot) as one
            except ValueError:
                pass
        if isinstance(value, kind):
            return value
    raise UserError(f"{key} must be {_type_names(allowed)}, got {value!r}")


def _type_names(kinds) -> str:
    return " or ".join({int: "an integer", float: "a number", str: "a string", bool: "true/false"}[k] for k in kinds)


# ------------------------------------------------------------------------------------------ checks


def check(config: Config) -> None:
    """Every check that needs only the config. Raises UserError (one line, with the fix)."""
    for (section, key), choices in CHOICES.items():
        value = getattr(getattr(config, section), key)
        for item in value if isinstance(value, list) else [value]:  # a list (train.eval_tasks): each of its items
            if item not in choices:
                raise UserError(f"{section}.{key}={item!r} is not one of {', '.join(choices)}")
    try:
        config.model.gpt_config().check()
    except ValueError as e:
        raise UserError(f"model: {e}") from None
    t = config.train
    if isinstance(t.compile, str) and t.compile != "auto":
        raise UserError(f"train.compile={t.compile!r} must be auto, true or false")
    if isinstance(t.micro_batch_size, str) and t.micro_batch_size != "auto":
        raise UserError(f"train.micro_batch_size={t.micro_batch_size!r} must be a positive integer or 'auto'")
    positive = {"train.max_steps": t.max_steps, "train.eval_batches": t.eval_batches, "logging.log_every": config.logging.log_every}
    if isinstance(t.micro_batch_size, int):
        positive["train.micro_batch_size"] = t.micro_batch_size
    for key, value in positive.items():
        if value < 1:
            raise UserError(f"{key}={value} must be at least 1")
    non_negative = [f"train.{key}" for key in ("global_batch_size", "warmup_steps", "lr_decay_steps", "eval_every", "grad_clip", "peak_tflops",
                                               "weight_decay", "max_skipped_steps", "eval_task_every", "eval_task_limit")]
    for key in non_negative + ["checkpoint.every_steps", "checkpoint.every_minutes", "checkpoint.remote_wait_minutes", "data.max_tokens"]:
        section, _, leaf = key.partition(".")
        if getattr(getattr(config, section), leaf) < 0:
            raise UserError(f"{key}={getattr(getattr(config, section), leaf)} must not be negative")
    parse_time_limit(t.time_limit)
    if 0 < t.lr_decay_steps < t.warmup_steps:
        # The cosine would start after it ended: warmup to the full lr, then straight down to min_lr.
        raise UserError(f"train.lr_decay_steps={t.lr_decay_steps} ends the decay before train.warmup_steps={t.warmup_steps} end the warmup: set lr_decay_steps >= warmup_steps (or 0 = max_steps)")
    if not (0 <= t.beta1 < 1 and 0 <= t.beta2 < 1):  # AdamW would refuse them with a traceback
        raise UserError(f"train.beta1={t.beta1} and train.beta2={t.beta2} must be in [0, 1) (e.g. 0.9 and 0.95)")
    if not 0 < t.lr or not 0 <= t.min_lr <= t.lr:
        raise UserError(f"need 0 < train.lr and 0 <= train.min_lr <= train.lr, got lr={t.lr}, min_lr={t.min_lr}")
    if not 0.0 < config.data.val_fraction < 1.0:
        raise UserError(f"data.val_fraction={config.data.val_fraction} must be between 0 and 1 (e.g. 0.01)")
    if config.checkpoint.keep_last_k < 1:
        raise UserError(f"checkpoint.keep_last_k={config.checkpoint.keep_last_k} must be at least 1 (the last good checkpoint is always kept)")
    if config.checkpoint.remote and "://" not in config.checkpoint.remote:
        raise UserError(f"checkpoint.remote={config.checkpoint.remote} is not a URL: give s3://bucket/prefix, gs://bucket/prefix, az://container/prefix or file:///mounted/drive")
    if config.parallel.strategy == "deepspeed" and not config.parallel.ds_config:
        raise UserError("parallel.strategy=deepspeed needs a DeepSpeed config: launch with `deepspeed launch/train.py --ds_config ds_configs/zero2.json ...`")


def check_runtime(config: Config, world_size: int, device_type: str, micro_batch_size: int) -> int:
    """Checks that need the launch's facts. Returns the gradient-accumulation steps."""
    if device_type != "cuda" and config.model.attn_backend in CUDA_ONLY_BACKENDS:
        raise UserError(f"model.attn_backend={config.model.attn_backend} needs a CUDA GPU: use auto, flash or math on {device_type}")
    per_step = micro_batch_size * world_size
    global_batch = config.train.global_batch_size or per_step
    if global_batch % per_step:
        raise UserError(f"train.global_batch_size={global_batch} is not divisible by micro_batch_size x world size = "
                        f"{micro_batch_size} x {world_size} = {per_step}: make it a multiple of {per_step}")
    return global_batch // per_step
