"""The subprocess side of a trial: `python -m dist_gpt.autotune.trial_process SPEC.json`, started by
dist_gpt.autotune.trials.TrialRunner (not a command for people): run the trial, write the result, exit."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
from pathlib import Path

import torch

from dist_gpt.autotune.measure import cuda_overhead_bytes, resident_bytes, run_steps
from dist_gpt.autotune.search import TrialResult
from dist_gpt.autotune.trials import TRIAL_TIMEOUT_S
from dist_gpt.config import from_dict
from dist_gpt.runtime.distributed import DistEnv, pick_backend
from dist_gpt.runtime.metrics import peak_resident_bytes
from dist_gpt.runtime.precision import DTYPES


def main(spec_path: str) -> None:
    """Run the trial SPEC.json describes, write its result where the spec says, exit without waiting on peers."""
    spec = json.loads(Path(spec_path).read_text())
    device = torch.device(spec["device"])
    if device.type == "cpu":
        from dist_gpt.runtime.malloc import keep_freed_memory

        keep_freed_memory()  # as the trainer does on CPU: the heap behaves as it will in training

    config = from_dict(spec["config"])
    env = DistEnv(rank=spec["rank"], local_rank=spec["local_rank"], world_size=spec["world_size"], device=device, compute_dtype=DTYPES[spec["dtype"]])
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the process group: NCCL binds to the current device
    store = _join_trial_group(spec, env) if spec["store"] else None
    if device.type == "cuda":
        overhead = cuda_overhead_bytes(device)
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, max(0.0, spec["budget_bytes"] - overhead) / total), device)
    else:
        overhead = resident_bytes()  # python + torch + the build path imported, nothing computed: the idle process
        if spec["data_limit_bytes"]:
            import resource

            resource.setrlimit(resource.RLIMIT_DATA, (spec["data_limit_bytes"], spec["data_limit_bytes"]))
    result = TrialResult(spec["micro_batch"])
    try:
        result.oom, result.tokens_per_s = run_steps(config, env, spec["micro_batch"], spec["micro_steps"], spec["steps"])
    except Exception as e:  # a bug, not a size: reported, and the tuning stops
        result.failed, result.note = True, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if not (result.oom or result.failed):
        result.peak_bytes = torch.cuda.max_memory_allocated(device) + overhead if device.type == "cuda" else peak_resident_bytes()
    if store is not None and (result.oom or result.failed):
        store.add(f"{spec['store'][2]}/{'oom' if result.oom else 'failed'}", 1)  # the other ranks' tuners watch these
    Path(spec["result"]).write_text(json.dumps({"result": dataclasses.asdict(result), "overhead_bytes": overhead}))
    sys.stdout.flush()
    os._exit(0)  # no process-group teardown: a peer that ran out may never answer


def _join_trial_group(spec: dict, env: DistEnv):
    import torch.distributed as dist

    host, port, prefix = spec["store"]
    store = dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=60))
    backend = pick_backend(spec["config"]["parallel"]["backend"], env.device, spec["config"]["parallel"]["fsdp_cpu_offload"])
    dist.init_process_group(backend, store=dist.PrefixStore(prefix, store), rank=env.rank, world_size=env.world_size,
                            timeout=datetime.timedelta(seconds=TRIAL_TIMEOUT_S))
    return store


if __name__ == "__main__":
    main(sys.argv[1])
