"""Training-step cost of the output layer's loss on CPU: plain vs chunked, glibc malloc default vs tuned.

Each configuration runs in a fresh process (allocator state and peak RSS are per process), and the sweep
runs the configurations interleaved, round after round, so drifting load on a shared machine hits all of
them alike. A configuration is LOSS:CHUNK:MALLOC with MALLOC one of
    default  glibc as shipped (GLIBC_TUNABLES and DIST_GPT_MALLOC removed from the environment)
    mallopt  keep_freed_memory() called in the running process, after the model and optimizer are built
    env      started with GLIBC_TUNABLES from malloc_env()

    python benchmarks/fused_loss.py --rounds 2                         # the sweep, seed model shape
    python benchmarks/fused_loss.py --one chunked:1024:mallopt         # one configuration, one JSON line
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

DEFAULT_CONFIGS = [f"plain:0:{m}" for m in ("default", "mallopt", "env")] + [
    f"chunked:{c}:{m}" for c in (256, 512, 1024, 2048) for m in ("default", "mallopt", "env")
]


def run_one(spec: str, args: argparse.Namespace) -> dict:
    import resource

    import torch

    from dist_gpt.model import GPT, preset
    from dist_gpt.runtime.malloc import keep_freed_memory, page_faults

    loss, chunk, malloc = spec.split(":")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = preset("seed", n_layer=args.n_layer, n_embd=args.n_embd, loss=loss, loss_chunk_tokens=int(chunk) or 1024)
    model = GPT(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    idx = torch.randint(0, 50257, (args.batch, config.block_size + 1))
    x, y = idx[:, :-1], idx[:, 1:]
    tuned = keep_freed_memory() if malloc == "mallopt" else None

    times, faults, losses = [], [], []
    for step in range(args.warmup + args.steps):
        f0, t0 = page_faults(), time.perf_counter()
        value = model(x, y)
        value.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt, df = time.perf_counter() - t0, page_faults() - f0
        if step >= args.warmup:
            times.append(dt)
            faults.append(df)
            losses.append(value.item())
    step_s = statistics.median(times)
    return dict(
        config=spec,
        mallopt_applied=tuned,
        step_s=round(step_s, 3),
        tok_s=round(x.numel() / step_s),
        faults_per_step=round(statistics.median(faults)),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        last_loss=round(losses[-1], 5),
    )


def child_env(malloc: str) -> dict[str, str]:
    from dist_gpt.runtime.malloc import malloc_env

    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "DIST_GPT_MALLOC")}
    return malloc_env(env) if malloc == "env" else env


def sweep(args: argparse.Namespace) -> None:
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("one", "rounds", "configs")]
    results: dict[str, list[dict]] = {c: [] for c in args.configs}
    for r in range(args.rounds):
        for spec in args.configs:
            out = subprocess.run(
                [sys.executable, __file__, "--one", spec, *passthrough],
                env=child_env(spec.split(":")[2]), capture_output=True, text=True, check=True,
            )
            row = json.loads(out.stdout.strip().splitlines()[-1])
            results[spec].append(row)
            print(f"round {r}: {json.dumps(row)}", file=sys.stderr, flush=True)

    print(f"\nB={args.batch} T=256 n_layer={args.n_layer} n_embd={args.n_embd} V=50304 fp32, {args.threads} threads, "
          f"median of {args.steps} steps after {args.warmup} warmup; per round values listed")
    print("| config | tokens/s (each round) | step s | faults/step | peak RSS MB |")
    print("|---|---|---|---|---|")
    for spec, rows in results.items():
        tok = " / ".join(str(r["tok_s"]) for r in rows)
        step = statistics.median(r["step_s"] for r in rows)
        faults = statistics.median(r["faults_per_step"] for r in rows)
        rss = max(r["peak_rss_mb"] for r in rows)
        print(f"| {spec} | {tok} | {step:.3f} | {faults:.0f} | {rss} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--one", help="run one configuration LOSS:CHUNK:MALLOC in this process and print JSON")
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=384)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args)))
    else:
        sweep(args)


if __name__ == "__main__":
    main()
