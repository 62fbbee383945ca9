"""The planner (dist_gpt.autotune.plan) against measurement: its predicted peak per GPU vs what the bench measures.

Each measurement is the real bench (`python -m dist_gpt.bench --json`, under `torchrun` for more than one
process) running real training steps of the option's strategy at one micro-batch; its peak is the resident
set on CPU (what the prediction's total counts: tensors, the idle process, the heap's slack) and
torch.cuda.max_memory_allocated on GPU (the prediction's tensors: the CUDA context is outside it).

    python benchmarks/plan_vs_measured.py --device cpu                          # tests/test_plan.py's shape
    python benchmarks/plan_vs_measured.py --device cuda --config gpt2-124m-owt --runs ddp:1,fsdp:1 --sizes 4,16 \\
        train.compile=false                                                        # the GPU check

--runs takes OPTION:PROCESSES items, OPTION a row of the planner (ddp, zero1, zero2, fsdp-no-reshard, fsdp,
zero3; "+ckpt" for activation checkpointing; ddp on one process is the single strategy).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from dist_gpt.autotune import plan

REPO = Path(__file__).resolve().parent.parent
# tests/test_plan.py's shape: activations, states and the loss's buffers each tens of MB, so the prediction's
# terms are all visible above the ~330 MB an idle CPU process holds, and a bench run takes seconds.
CPU_SHAPE = ["model.n_layer=2", "model.n_head=2", "model.n_embd=256", "model.block_size=256", "model.vocab_size=16384",
             "model.tokenizer_vocab_size=16384", "model.loss_chunk_tokens=1024", "train.global_batch_size=0"]


def option_named(label: str) -> plan.Option:
    return next(o for o in plan.OPTIONS if o.label == label.replace("+ckpt", " +ckpt"))


def launch_overrides(option: plan.Option, processes: int) -> list[str]:
    """The config the bench needs to run this option (what the planner's command line sets)."""
    settings = plan.option_settings(option, processes)
    if option.ds_config:
        settings["parallel.ds_config"] = option.ds_config
    return [plan.override(k, v) for k, v in settings.items()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measured_peak_mb(config: str, overrides: list[str], option: plan.Option, processes: int, micro_batch: int,
                     env: dict | None = None, timeout: float = 600) -> float:
    """Rank 0's peak_memory_mb from the real bench: 1 warm-up step and 2 measured ones."""
    bench = ["-m", "dist_gpt.bench", "--config", config, "--json", "--steps", "2", "--warmup", "1",
             *overrides, *launch_overrides(option, processes), f"train.micro_batch_size={micro_batch}"]
    if processes > 1:
        bench = ["-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--master_addr=127.0.0.1", f"--master_port={free_port()}", *bench]
    env = env or {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, *bench], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"bench exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout[proc.stdout.index("{"):])["results"][0]["peak_memory_mb"]


def predicted_mb(config: str, overrides: list[str], option: plan.Option, processes: int, micro_batch: int, device: str) -> float:
    """The planner's prediction for the same run; on CUDA the tensors only (what max_memory_allocated counts)."""
    request = plan.Request(config, tuple(overrides), gpus=processes, device=device)
    breakdown = plan.predict(request, request.config(), option, micro_batch)
    return (breakdown.total if device == "cpu" else breakdown.tensors) / plan.MB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="bible-tiny")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--runs", default="ddp:1,ddp:2,fsdp:2", help="OPTION:PROCESSES, comma-separated")
    parser.add_argument("--sizes", default="4,16", help="micro-batches, comma-separated")
    parser.add_argument("overrides", nargs="*", help="section.key=value (default on CPU: the test's small shape)")
    args = parser.parse_args()
    overrides = [f"train.device={args.device}", *(args.overrides or (CPU_SHAPE if args.device == "cpu" else []))]
    print(f"{'option':<18}{'processes':>10}{'micro-batch':>12}{'predicted MB':>14}{'measured MB':>13}{'error':>8}", flush=True)
    for run in args.runs.split(","):
        label, _, processes = run.partition(":")
        option, processes = option_named(label), int(processes or 1)
        for size in (int(s) for s in args.sizes.split(",")):
            predicted = predicted_mb(args.config, overrides, option, processes, size, args.device)
            measured = measured_peak_mb(args.config, overrides, option, processes, size)
            print(f"{label:<18}{processes:>10}{size:>12}{predicted:>14,.1f}{measured:>13,.1f}{predicted / measured - 1:>+8.1%}", flush=True)


if __name__ == "__main__":
    main()
