"""`python -m dist_gpt.doctor`: what to run first on a freshly rented machine. It checks, and prints as one table:

- versions: Python, torch (and the CUDA it was built for), the NVIDIA driver, NCCL, DeepSpeed, Triton;
- per GPU: name, memory, compute capability, native bf16 / fp16, which attention (SDPA) kernels really run
  (flash, efficient, cudnn, math: each forced in turn, as the model's probe does), and a measured matmul
  TFLOP/s against the data-sheet peak;
- a 20-step training of the GPT-2 124M shape on synthetic tokens with the default settings (the dtype and
  compile mode the trainer chooses), through the real trainer: tokens/s, MFU, peak memory;
- a checkpoint save + resume round trip: a second run resumes the first one's step-10 checkpoint and must
  reach the same loss at step 20;
- with 2 or more GPUs, the all-reduce bus bandwidth (NCCL); on a CPU machine, of 2 gloo processes.

On a CPU-only machine the same checks run small (a tiny model shape), in well under a minute on 2 cores.
Exit status 0 when every check passed, 1 naming the ones that failed. `--json PATH` also writes the results.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed

from dist_gpt.errors import UserError, cli
from dist_gpt.model import ATTENTION_BACKENDS, sdpa_kernel_that_runs
from dist_gpt.runtime.metrics import gpu_peak_flops_from_table, measure_matmul_flops, synchronize
from dist_gpt.runtime.precision import DeviceFacts, choose_dtype, dtype_name

TRAIN_STEPS = 20
RESUME_FROM = 10  # the round trip resumes this step's checkpoint and trains to TRAIN_STEPS again
# How close the resumed run's step-20 losses must be to the straight run's: bit-exact on CPU; CUDA kernels
# with atomics (embedding and attention backward) are not bit-deterministic, so ten steps may drift a little.
RESUME_REL_TOL = {"cpu": 1e-6, "cuda": 2e-3}
MATMUL_WARN_FRACTION = 0.5  # below this share of the data sheet: a throttled, power-capped or shared GPU
# The training shapes: GPT-2 124M at gpt2-124m-owt's micro-batch on a GPU; a tiny one on CPU (same code path).
GPU_SHAPE = ["model.preset=gpt2", "train.micro_batch_size=12"]
CPU_SHAPE = ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=64", "train.micro_batch_size=4"]


@dataclass
class Check:
    name: str
    result: str
    status: str = "ok"  # ok | warn | FAIL | skip | info
    numbers: dict = field(default_factory=dict)


def run_check(name: str, fn, *args) -> Check:
    """fn returns (result, status[, numbers]); an exception is that check's FAIL, never the doctor's crash."""
    try:
        result, status, *numbers = fn(*args)
        return Check(name, result, status, numbers[0] if numbers else {})
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
        return Check(name, describe_failure(e), "FAIL")


def describe_failure(e: BaseException) -> str:
    """One line: the exception's own first line, or for errors that wrap a remote traceback (DCP), its last."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()] or [""]
    line = lines[-1].strip() if any(line.startswith("Traceback") for line in lines) else lines[0]
    return f"{type(e).__name__}: {line}"[:300]


# ------------------------------------------------------------------------------------------ versions, devices


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def driver_version() -> str | None:
    """The NVIDIA driver's own version (nvidia-smi), not the CUDA runtime torch was built against."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def version_checks() -> list[Check]:
    cuda = torch.cuda.is_available()
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    driver = driver_version()
    checks = [
        Check("python", platform.python_version()),
        Check("torch", f"{torch.__version__} ({build})"),
        Check("NVIDIA driver", driver or "none found (no nvidia-smi)", "ok" if driver else "warn" if cuda else "skip"),
    ]
    if driver and not cuda:
        checks[-1] = Check("NVIDIA driver", f"{driver}, but torch sees no GPU: a CPU build of torch, or a driver too old for CUDA {torch.version.cuda}", "FAIL")
    if cuda and torch.distributed.is_nccl_available():
        checks.append(Check("NCCL", ".".join(map(str, torch.cuda.nccl.version()))))
    deepspeed = package_version("deepspeed")  # not imported: that takes seconds and may build ops
    checks.append(Check("DeepSpeed", deepspeed or "not installed (only parallel.strategy=deepspeed needs it)", "ok" if deepspeed else "skip"))
    if cuda:
        triton = package_version("triton") or package_version("pytorch-triton")
        checks.append(Check("Triton", triton or "not installed: train.compile needs it on CUDA (use train.compile=false)", "ok" if triton else "warn"))
    return checks


def devices() -> list[torch.device]:
    if torch.cuda.is_available():
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [torch.device("cpu")]


def describe_device(device: torch.device) -> tuple[str, str]:
    if device.type == "cpu":
        import psutil

        return f"{os.cpu_count()} cores ({torch.get_num_threads()} threads), {psutil.virtual_memory().total / 2**30:.0f} GiB RAM", "ok"
    facts = DeviceFacts.of(device)
    memory = torch.cuda.get_device_properties(device).total_memory / 2**30
    major, minor = facts.capability
    bf16 = "native" if facts.native_bf16 else "emulated only (train in fp16)"
    fp16 = "tensor cores" if facts.capability >= (7, 0) else "no tensor cores"
    return f"{facts.name}, {memory:.1f} GiB, compute capability {major}.{minor}, bf16 {bf16}, fp16 {fp16}", "ok"


def sdpa_check(device: torch.device) -> tuple[str, str]:
    """Each backend forced in turn, in the dtype training would use, at GPT-2's head shape."""
    dtype = choose_dtype("auto", DeviceFacts.of(device))
    seq = 1024 if device.type == "cuda" else 64
    ran, parts = [], []
    for name in ("flash", "efficient", "cudnn", "math"):
        label = sdpa_kernel_that_runs(ATTENTION_BACKENDS[name], device, dtype, 12, seq, 64, name)
        runs = not label.startswith("none")
        ran += [name] if runs else []
        parts.append(f"{name} {'yes' if runs else 'no'}" + (" (PyTorch's CPU kernel)" if label.startswith("cpu-flash") else ""))
    default = sdpa_kernel_that_runs(None, device, dtype, 12, seq, 64)
    result = f"{', '.join(parts)}; auto picks {default.split(' (')[0]} ({dtype_name(dtype)})"
    fused = device.type == "cpu" or any(name in ran for name in ("flash", "efficient", "cudnn"))
    return result if fused else result + ": no fused kernel runs, attention will be slow and memory-hungry", "ok" if fused else "warn"


def matmul_check(device: torch.device) -> tuple[str, str, dict]:
    dtype = choose_dtype("auto", DeviceFacts.of(device))
    size = 8192 if device.type == "cuda" else 1024
    measured = measure_matmul_flops(device, dtype, size=size)
    numbers = {"matmul_tflops": measured / 1e12}
    if device.type == "cpu":
        return f"{measured / 1e12:.3f} TFLOP/s {dtype_name(dtype)} ({size}^3; CPUs have no data sheet: this is MFU's yardstick)", "ok", numbers
    peak = gpu_peak_flops_from_table(torch.cuda.get_device_name(device))
    if peak is None:
        return f"{measured / 1e12:.0f} TFLOP/s {dtype_name(dtype)} ({size}^3; not in the data-sheet table)", "ok", numbers
    fraction = measured / peak
    numbers["matmul_of_datasheet"] = fraction
    status = "ok" if fraction >= MATMUL_WARN_FRACTION else "warn"
    return f"{measured / 1e12:.0f} TFLOP/s {dtype_name(dtype)} = {100 * fraction:.0f} % of the {peak / 1e12:.0f} TFLOP/s data sheet", status, numbers


# ------------------------------------------------------------------------------------------ training, checkpoints


def training_config(workdir: Path, device_type: str, run_name: str, *extra: str):
    from dist_gpt.config import load_config

    shape = GPU_SHAPE if device_type == "cuda" else CPU_SHAPE
    overrides = [
        *shape,
        f"data.dir={workdir / 'data'}",
        f"train.out_dir={workdir / 'runs'}",
        f"train.run_name={run_name}",
        "train.global_batch_size=0",  # one micro-batch per step
        f"train.max_steps={TRAIN_STEPS}",
        "train.warmup_steps=5",
        "train.lr_decay_steps=0",
        "train.eval_every=0",
        "train.eval_batches=1",
        "logging.log_every=10",
        f"checkpoint.every_steps={RESUME_FROM}",
        "checkpoint.every_minutes=0",
        *extra,
    ]
    return load_config("gpt2-124m-owt", overrides)  # the default settings otherwise: dtype auto, compile auto


def quiet_train(config, log_path: Path) -> dict:
    """A training run as launch/train.py starts it, its console output into log_path."""
    from dist_gpt.train.run import run_training

    with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            return run_training(config)
        except BaseException:
            traceback.print_exc(file=log)
            raise


def write_data(workdir: Path, device_type: str) -> None:
    from dist_gpt.data.synthetic import write_synthetic_dataset

    tokens = 2_000_000 if device_type == "cuda" else 200_000
    write_synthetic_dataset(workdir / "data", tokens)


def training_check(workdir: Path, device_type: str) -> tuple[str, str, dict]:
    write_data(workdir, device_type)
    config = training_config(workdir, device_type, "straight")
    summary = quiet_train(config, workdir / "train.log")
    records = [json.loads(line) for line in (workdir / "runs" / "straight" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    peak_mb = max(max(v for k, v in r.items() if k in ("mem_peak_alloc_mb", "mem_peak_rss_mb")) for r in steps)
    numbers = {k: summary[k] for k in ("tokens_per_s", "mfu", "train_loss", "val_loss", "dtype", "compile", "micro_batch_size")}
    numbers.update(peak_memory_mb=peak_mb, first_loss=steps[0]["loss"])
    losses = [r["loss"] for r in steps] + [summary["train_loss"], summary["val_loss"]]  # non-finite ones are JSON null
    if any(loss is None or not math.isfinite(loss) for loss in losses):
        return f"non-finite loss: {losses}", "FAIL", numbers
    shape = "gpt2 124M" if device_type == "cuda" else "tiny GPT"
    precision = numbers["dtype"] + (f", loss scale {summary['loss_scale']:g}, {summary['overflow_skips']} overflow skips" if "loss_scale" in summary else "")
    result = (
        f"{shape}, {TRAIN_STEPS} steps of {summary['micro_batch_size']} x {config.model.block_size} tokens, {precision}, "
        f"compile {'per block' if summary['compile'] else 'off'}: {summary['tokens_per_s']:,.0f} tok/s, MFU {100 * summary['mfu']:.1f} %, "
        f"peak {peak_mb / 1024:.2f} GiB, loss {steps[0]['loss']:.2f} -> {summary['train_loss']:.2f}"
    )
    if summary["train_loss"] >= steps[0]["loss"]:
        return result + ": the loss did not fall", "FAIL", numbers
    return result, "ok", numbers


def resume_check(workdir: Path, device_type: str) -> tuple[str, str, dict]:
    """Resume the straight run's step-10 checkpoint in a second run and train to step 20 again."""
    straight = workdir / "runs" / "straight"
    if not (straight / "metrics.jsonl").is_file():
        raise RuntimeError("the training check did not get far enough to save a checkpoint")
    source = straight / "checkpoints" / f"step_{RESUME_FROM:06d}"
    start = time.perf_counter()
    resumed = quiet_train(training_config(workdir, device_type, "resumed", f"checkpoint.resume={source}"), workdir / "train.log")
    seconds = time.perf_counter() - start
    want = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    want_train = next(r["loss"] for r in want if r.get("step") == TRAIN_STEPS and "loss" in r)
    want_val = next(r["val_loss"] for r in want if r.get("step") == TRAIN_STEPS and "val_loss" in r)
    delta = max(abs(resumed["train_loss"] - want_train) / want_train, abs(resumed["val_loss"] - want_val) / want_val)
    tolerance = RESUME_REL_TOL["cuda" if device_type == "cuda" else "cpu"]
    result = f"resumed step {RESUME_FROM} -> step {TRAIN_STEPS} in {seconds:.1f} s: losses {'equal' if delta == 0 else f'{delta:.1e} apart'} (tolerance {tolerance:g})"
    return result, "ok" if delta <= tolerance else "FAIL", {"resume_rel_delta": delta}


# ------------------------------------------------------------------------------------------ all-reduce


def _allreduce_worker(rank: int, world: int, init_file: str, megabytes: int, results) -> None:
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x = torch.zeros(megabytes * 2**20 // 4, device=device)
        for _ in range(3):
            dist.all_reduce(x)
        synchronize(device)
        iterations, start = 10, time.perf_counter()
        for _ in range(iterations):
            dist.all_reduce(x)
        synchronize(device)
        seconds = (time.perf_counter() - start) / iterations
        if rank == 0:  # bus bandwidth as nccl-tests defines it: what each link carries in a ring all-reduce
            results.put(x.numel() * 4 * 2 * (world - 1) / world / seconds)
    finally:
        dist.destroy_process_group()


def allreduce_bus_bandwidth(world: int, megabytes: int) -> float:
    """Bytes/s; `world` processes (one per GPU with NCCL, or gloo on CPU), spawned here."""
    import torch.multiprocessing as mp

    from dist_gpt.tools import doctor  # by module name: also when this file runs as __main__, the children import it

    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    with tempfile.TemporaryDirectory(prefix="dist_gpt_allreduce_") as tmp:
        mp.start_processes(doctor._allreduce_worker, args=(world, str(Path(tmp) / "init"), megabytes, results), nprocs=world, start_method="spawn")
    return results.get()


def allreduce_check() -> tuple[str, str, dict]:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 1:
        return "one GPU: nothing to all-reduce", "skip", {}
    world, megabytes = (gpus, 256) if gpus else (2, 16)
    busbw = allreduce_bus_bandwidth(world, megabytes)
    how = f"NCCL, {world} GPUs" if gpus else "gloo, 2 CPU processes"
    return f"{busbw / 1e9:.1f} GB/s bus bandwidth ({how}, {megabytes} MB fp32)", "ok", {"allreduce_busbw_gbs": busbw / 1e9}


# ------------------------------------------------------------------------------------------ the table


def run_doctor(workdir: Path) -> list[Check]:
    checks = version_checks()
    for device in devices():
        label = "cpu" if device.type == "cpu" else f"gpu{device.index}"
        description, status = describe_device(device)
        checks.append(Check(label, description, status))
        checks.append(run_check(f"{label} attention kernels", sdpa_check, device))
        checks.append(run_check(f"{label} matmul", matmul_check, device))
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    for name, check in (("training (defaults)", training_check), ("checkpoint save + resume", resume_check)):
        checks.append(run_check(name, check, workdir, device_type))
        if checks[-1].status == "FAIL":  # the usual cause on a rented box: the disk
            checks[-1].result += f" ({shutil.disk_usage(workdir).free / 2**20:,.1f} MB free in {workdir.parent})"
    checks.append(run_check("all-reduce", allreduce_check))
    return checks


def format_table(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{'check':{width}s}  {'status':6s}  result", f"{'-' * width}  ------  {'-' * 60}"]
    lines += [f"{c.name:{width}s}  {c.status:6s}  {c.result}" for c in checks]
    return "\n".join(lines)


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="", help="where the training and checkpoint checks write (default: a temporary directory, removed after); point it at the disk your checkpoints will use")
    parser.add_argument("--json", default="", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.dir and not Path(args.dir).is_dir():
        raise UserError(f"--dir {args.dir} is not a directory: give an existing one (the checks write a temporary folder inside it)")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dist_gpt_doctor_", dir=args.dir or None) as tmp:
        workdir = Path(tmp)
        checks = run_doctor(workdir)
        failed = [c.name for c in checks if c.status == "FAIL"]
        if any(c.name.startswith(("training", "checkpoint")) for c in checks if c.status == "FAIL") and (workdir / "train.log").is_file():
            kept = Path(tempfile.gettempdir()) / "dist_gpt_doctor_train.log"
            shutil.copy(workdir / "train.log", kept)
            checks.append(Check("training log", str(kept), "info"))
    print(format_table(checks))
    if args.json:
        Path(args.json).write_text(json.dumps({"checks": [asdict(c) for c in checks], "seconds": time.perf_counter() - start}, indent=1))
    if failed:
        print(f"doctor: FAILED: {', '.join(failed)} ({time.perf_counter() - start:.0f} s)", flush=True)
        sys.exit(1)
    print(f"doctor: all checks passed ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
