"""What a run reports: throughput, MFU, memory; to the console, a JSONL file and (optionally) wandb."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import time
from pathlib import Path

import psutil
import torch

from dist_gpt.runtime.precision import HALF_DTYPES, dtype_name

# Dense 16-bit tensor-core peaks (FLOP/s; bf16 = fp16 where both exist, fp16 on T4 and V100) from the vendors' data
# sheets, matched against the device name.
KNOWN_GPU_PEAK_FLOPS = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}


def gpu_peak_flops_from_table(device_name: str) -> float | None:
    for key, flops in KNOWN_GPU_PEAK_FLOPS.items():  # most specific keys first
        if key in device_name:
            return flops
    return None


def measure_matmul_flops(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 1024, windows: int = 5, seconds: float = 0.1) -> float:
    """Achievable matmul FLOP/s on this device: the practical peak that MFU is measured against on CPU.

    The best of several short windows: a moment of contention (another rank measuring too, another job)
    lowers some windows, not the best one, so the peak is not underestimated and MFU not inflated."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    best = 0.0
    for _ in range(windows):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            count += 1
            if device.type != "cpu":
                synchronize(device)
        best = max(best, 2 * size**3 * count / (time.perf_counter() - start))
    return best


REMEASURE_ENV = "DIST_GPT_REMEASURE_PEAK"  # =1: measure this machine's CPU peak again (the cache keeps the higher)


class PeakFlops:
    """The FLOP/s one rank's MFU is measured against, and where the figure came from.

    GPUs: the data sheet (bf16/fp16 dense), else a measured matmul. A CPU has no data sheet: its peak is measured
    once per machine (the best of a few seconds of matmul windows) and cached, or given as train.peak_tflops.
    A measurement is not a guaranteed upper bound: a core held by another process during it lowers it, and MFU
    would read above 100 %. So the peak is max(measured, observed): `mfu` raises it to any throughput a run
    really achieves and records that in the cache. MFU never exceeds 100 % because the yardstick is the best
    seen on this machine, not because a figure is clipped."""

    def __init__(self, flops: float, source: str, cache_key: str | None = None):
        self.flops, self.source, self.cache_key = flops, source, cache_key

    def mfu(self, achieved_flops: float) -> float:
        """achieved_flops / peak, for one rank's FLOP/s."""
        if achieved_flops > self.flops:
            self.flops, self.source = achieved_flops, "observed in training, above the measured matmul"
            if self.cache_key:
                _store_cpu_peak(self.cache_key, achieved_flops)
        return achieved_flops / self.flops


def device_peak(device: torch.device, dtype: torch.dtype, configured_tflops: float = 0.0) -> PeakFlops:
    """The peak for this device: train.peak_tflops if given; GPUs the data-sheet table, else a measured matmul;
    CPUs their "data sheet" (cores x clock x FLOPs per cycle of the vector instructions torch uses, a figure that
    no load on the machine changes, so MFU compares between runs), with the matmul rate measured once per machine
    shown beside it; the measured rate itself where it is the higher (the clock reported is below the real one)
    or the nominal figure is unknown (not x86)."""
    if configured_tflops > 0:
        return PeakFlops(configured_tflops * 1e12, "train.peak_tflops")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops_from_table(name)
        if peak is not None and dtype in HALF_DTYPES:  # 16-bit tensor cores: bf16 and fp16 peaks are the same
            return PeakFlops(peak, f"{name} data sheet ({dtype_name(dtype)} dense)")
        return PeakFlops(measure_matmul_flops(device, dtype, size=4096), f"measured {dtype} matmul on {name}")
    measured = measured_cpu_peak(device, dtype)
    nominal = cpu_nominal_peak(dtype)
    if nominal is None:
        return measured
    flops, how = nominal
    if measured.flops > flops:  # the cores run above the clock they report (a VM shows its base clock): the faster one
        measured.source = f"cpu matmul measured on this machine, above the nominal {how} = {flops / 1e12:.3f}"
        return measured
    return PeakFlops(flops, f"cpu nominal: {how}; measured matmul {measured.flops / 1e12:.3f}")


# FLOPs per cycle per core of the instructions torch's CPU kernels use (torch.backends.cpu.get_cpu_capability()):
# fp32 fused multiply-adds (2 FLOPs) of the vector width on 2 FMA pipes, as every x86 server core since Haswell
# and Zen 1 has; AMD's Zen 4 runs AVX-512 on its two 256-bit pipes (AVX2's rate). bf16 matmuls go to AMX tiles
# where the CPU has them (oneDNN), else to AVX512-BF16 dot products (twice fp32), else they are fp32's.
CPU_FP32_FLOPS_PER_CYCLE = {"AVX2": 32, "AVX512": 64}
AMX_BF16_FLOPS_PER_CYCLE = 1024


def cpu_nominal_peak(dtype: torch.dtype) -> tuple[float, str] | None:
    """(FLOP/s, how it was computed) for this process's threads: cores x clock x FLOPs/cycle; None if unknown."""
    capability = torch.backends.cpu.get_cpu_capability()
    info = _cpuinfo()
    per_cycle = CPU_FP32_FLOPS_PER_CYCLE.get(capability)
    ghz = _cpu_max_ghz(info)
    if per_cycle is None or ghz is None:
        return None
    if capability == "AVX512" and info.get("vendor_id") == "AuthenticAMD":
        per_cycle = CPU_FP32_FLOPS_PER_CYCLE["AVX2"]
    unit = f"{capability} fp32"
    if dtype == torch.bfloat16 and "amx_bf16" in info.get("flags", ""):
        per_cycle, unit = AMX_BF16_FLOPS_PER_CYCLE, "AMX bf16"
    elif dtype == torch.bfloat16 and "avx512_bf16" in info.get("flags", ""):
        per_cycle, unit = 2 * per_cycle, "AVX512-BF16"
    cores = min(torch.get_num_threads(), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    return cores * ghz * 1e9 * per_cycle, f"{cores} cores x {ghz:.2f} GHz x {per_cycle} FLOP/cycle ({unit})"


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def _cpu_max_ghz(info: dict[str, str]) -> float | None:
    """The highest clock the cores run at: cpufreq's maximum where the kernel has one (a turbo clock does not move
    with load), else the clock /proc/cpuinfo reports (a VM's fixed nominal clock)."""
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1e6
    except (OSError, ValueError):
        pass
    try:
        return round(float(info["cpu MHz"]) / 10) / 100  # to 10 MHz: the reported figure wobbles in its last digits
    except (KeyError, ValueError):
        return None


def measured_cpu_peak(device: torch.device, dtype: torch.dtype) -> PeakFlops:
    """The CPU's matmul rate, measured once per machine and cached (DIST_GPT_REMEASURE_PEAK=1 measures again)."""
    key = f"{_cpu_name()} | {torch.get_num_threads()} threads | {str(dtype).removeprefix('torch.')} | torch {torch.__version__}"
    cached = _load_cpu_peaks().get(key)
    if cached and os.environ.get(REMEASURE_ENV, "") in ("", "0"):
        return PeakFlops(cached, f"cpu, {torch.get_num_threads()} threads, measured once on this machine ({CPU_PEAK_FILE} in {cache_root()})", key)
    # On CPU a bf16 matmul may be slower than fp32 (no bf16 units): the peak is the faster of the two, so
    # MFU is never high because the yardstick was the slow path. fp16 is never the faster one on a CPU (its
    # matmuls are converted, seconds per window), so fp16 runs are measured against fp32.
    measured = max(measure_matmul_flops(device, d, windows=20, seconds=0.15) for d in {torch.float32, dtype} - {torch.float16})
    measured = _store_cpu_peak(key, measured)
    return PeakFlops(measured, f"cpu, {torch.get_num_threads()} threads, measured now (cached in {cache_root() / CPU_PEAK_FILE})", key)


CPU_PEAK_FILE = "cpu_peak_flops.json"


def cache_root() -> Path:
    """Where dist_gpt keeps what it measured on this machine ($DIST_GPT_CACHE, default ~/.cache/dist_gpt)."""
    root = os.environ.get("DIST_GPT_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "dist_gpt"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load_cpu_peaks() -> dict[str, float]:
    try:
        peaks = json.loads((cache_root() / CPU_PEAK_FILE).read_text())
        return peaks if isinstance(peaks, dict) else {}
    except (OSError, ValueError):
        return {}


def _store_cpu_peak(key: str, flops: float) -> float:
    """Record a peak and return the one now stored: the higher of it and the old one, since nothing measured or
    achieved can exceed what the machine can do, while a busy moment can lower a measurement. Written
    atomically; a failure to write (a read-only home) only costs a measurement next time."""
    peaks = _load_cpu_peaks()
    peaks[key] = max(flops, peaks.get(key, 0.0))
    path = cache_root() / CPU_PEAK_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # ranks may write at once: each its own temp file
        tmp.write_text(json.dumps(peaks, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass
    return peaks[key]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_resident_bytes() -> int:
    """This process's peak resident set: VmHWM, the high-water mark of its own address space. Not
    getrusage's ru_maxrss: Linux carries the parent's resident set at fork time into the child's maxrss
    across exec, so a child of a big process would read the parent's size."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux; an upper bound


def reset_peak_memory(device: torch.device) -> None:
    """Start the peaks memory_stats reports afresh: the CUDA allocator's, or on Linux the resident set's high-water
    mark (VmHWM; writing 5 to /proc/self/clear_refs resets it). Best effort elsewhere."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def memory_stats(device: torch.device) -> dict[str, float]:
    """Memory in MB: the CUDA caching allocator's peaks on GPU; on CPU the resident set now and its peak."""
    if device.type == "cuda":
        return {
            "mem_peak_alloc_mb": torch.cuda.max_memory_allocated(device) / 2**20,
            "mem_peak_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20,
        }

    return {
        "mem_rss_mb": psutil.Process().memory_info().rss / 2**20,
        "mem_peak_rss_mb": peak_resident_bytes() / 2**20,  # VmHWM: ru_maxrss would report a launcher parent's size
    }


def strict_json(value):
    """`value` with every non-finite float as None (JSON null): metrics.jsonl stays strict JSON, which jq,
    browsers and many loaders insist on (Python's json would write NaN / Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def _drop_partial_line(file) -> None:
    """A process killed (or a disk filled) mid-write can leave a last line without its newline: cut it, or the
    next record would be glued to it and both lost to a JSON reader."""
    size = file.seek(0, os.SEEK_END)
    if size == 0:
        return
    with open(file.name, "rb") as reader:
        reader.seek(max(0, size - (1 << 16)))
        tail = reader.read()
    if not tail.endswith(b"\n"):
        cut = tail.rfind(b"\n")
        with contextlib.suppress(OSError):
            file.truncate(size - len(tail) + cut + 1 if cut >= 0 else (0 if size <= 1 << 16 else size))


class MetricsLogger:
    """One JSON object per line in RUN_DIR/metrics.jsonl (always), the console, and wandb when asked.

    Only the main rank logs; the others get a logger whose calls do nothing."""

    def __init__(self, run_dir: Path, enabled: bool, wandb_mode: str = "off", wandb_project: str = "dist_gpt", config: dict | None = None, wandb_run_id: str | None = None):
        self.enabled = enabled
        self.wandb_run = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self.file = open(self.path, "ab", buffering=0)
        _drop_partial_line(self.file)
        self.write_failed = False  # warned once per failing stretch; training goes on
        if wandb_mode != "off":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb_run = wandb.init(
                project=wandb_project,
                name=run_dir.name,
                dir=str(run_dir),
                config=config,
                mode=wandb_mode,
                id=wandb_run_id,
                resume="allow" if wandb_run_id else None,
            )

    @property
    def wandb_run_id(self) -> str | None:
        return self.wandb_run.id if self.wandb_run is not None else None

    def log(self, record: dict, console: str | None = None) -> None:
        if not self.enabled:
            return
        self._append((json.dumps(strict_json(record), allow_nan=False) + "\n").encode())
        if console:
            print(console, flush=True)
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record.get("step"))

    def _append(self, line: bytes) -> None:
        """One whole line or none: a write that fails part-way (a full disk) is cut back, so the file never holds
        half a record that the next one would run into. The failure is one warning; the run trains on."""
        start = self.file.seek(0, os.SEEK_END)
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(self.file.fileno(), view):]
        except OSError as e:
            with contextlib.suppress(OSError):
                self.file.truncate(start)
            if not self.write_failed:
                print(f"warning: cannot write {self.path} ({e.strerror or e}): its records are lost until it can; training goes on", flush=True)
            self.write_failed = True
            return
        if self.write_failed:
            print(f"{self.path} is writable again: records continue (some are missing)", flush=True)
        self.write_failed = False

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
