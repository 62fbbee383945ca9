"""What a run reports: throughput, MFU, memory; to the console, a JSONL file and (optionally) wandb."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import psutil
import torch

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, matched against the device name.
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


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s, where it came from). GPUs: the data-sheet table, else a measured matmul; CPU: measured."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops_from_table(name)
        if peak is not None and dtype == torch.bfloat16:
            return peak, f"{name} data sheet (bf16 dense)"
        return measure_matmul_flops(device, dtype, size=4096), f"measured {dtype} matmul on {name}"
    # On CPU a bf16 matmul may be slower than fp32 (no bf16 units): the peak is the faster of the two, so
    # MFU never reads above 100% because the yardstick was the slow path.
    candidates = {d: measure_matmul_flops(device, d) for d in {torch.float32, dtype}}
    best = max(candidates, key=candidates.get)
    return candidates[best], f"measured {str(best).removeprefix('torch.')} matmul on cpu ({torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_stats(device: torch.device) -> dict[str, float]:
    """Memory in MB: the CUDA caching allocator's peaks on GPU; on CPU the resident set now and its peak."""
    if device.type == "cuda":
        return {
            "mem_peak_alloc_mb": torch.cuda.max_memory_allocated(device) / 2**20,
            "mem_peak_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20,
        }
    from dist_gpt.memory import peak_resident_bytes  # VmHWM: ru_maxrss would report a launcher parent's size

    return {
        "mem_rss_mb": psutil.Process().memory_info().rss / 2**20,
        "mem_peak_rss_mb": peak_resident_bytes() / 2**20,
    }


class MetricsLogger:
    """One JSON object per line in RUN_DIR/metrics.jsonl (always), the console, and wandb when asked.

    Only the main rank logs; the others get a logger whose calls do nothing."""

    def __init__(self, run_dir: Path, enabled: bool, wandb_mode: str = "off", wandb_project: str = "dist_gpt", config: dict | None = None, wandb_run_id: str | None = None):
        self.enabled = enabled
        self.wandb_run = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(run_dir / "metrics.jsonl", "a", buffering=1)
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
        self.file.write(json.dumps(record) + "\n")
        if console:
            print(console, flush=True)
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record.get("step"))

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
