"""The seed's first experiment on a laptop: RoPE vs learned positions on the Spanish Bible, CPU-sized.

The two recipes seed-bible-rope and seed-bible-learned (the log's 2 layers x 2 heads, block 256, untied output
layer), scaled down to 128 wide and 250 steps of 8 x 256 tokens, with bible-tiny's learning rate (the log's
constant 6e-5 barely moves a model in 250 steps). Both variants train on the same data, with the same steps
and the same seeds (train.seed 1, 2, 3: the same batches in the same order for both; the weights differ,
since the learned table draws from the RNG). Two runs go at a time, one thread each. Then it writes the
results block of docs/experiments.md (mean +- std of the final val loss per variant, the per-seed pairs, the
`dist_gpt.compare` table, the machine and this command) and the `dist_gpt.plot` overlay next to it.

    python -m dist_gpt.prepare --config bible-tiny          # data/bible-es, once
    python benchmarks/seed_rope_vs_learned.py               # ~20 min on 2 idle cores; runs in out/seed-cpu/

A run already complete is not trained again, so an interrupted sweep is finished by the same command.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {"rope": "seed-bible-rope", "learned": "seed-bible-learned"}
STEPS = 250
CPU_SIZE = [
    "model.n_embd=128",  # the log's 384 is ~3x the output layer's cost, which dominates on CPU
    "train.micro_batch_size=8",  # 8 x 256 = 2,048 tokens a step
    "train.global_batch_size=8",
    f"train.max_steps={STEPS}",
    "train.lr=3e-3",  # bible-tiny's schedule, chosen before any run, not tuned on this comparison
    "train.min_lr=3e-4",
    "train.warmup_steps=20",
    "train.eval_every=50",
    "train.eval_batches=20",  # 160 windows of 256: the 21k-token val split about twice over
    "logging.log_every=10",
    "checkpoint.every_steps=0",
]
BEGIN, END = "<!-- seed_rope_vs_learned:begin -->", "<!-- seed_rope_vs_learned:end -->"


def run_name(variant: str, seed: int) -> str:
    return f"{variant}-s{seed}"


def train_command(variant: str, seed: int, out_dir: Path) -> list[str]:
    return [
        sys.executable, "launch/train.py", "--config", VARIANTS[variant], *CPU_SIZE,
        f"train.seed={seed}", f"train.out_dir={out_dir}", f"train.run_name={run_name(variant, seed)}",
    ]  # fmt: skip


def is_complete(run_dir: Path) -> bool:
    from dist_gpt.tools.runs import read_run

    return (run_dir / "metrics.jsonl").is_file() and read_run(run_dir).steps >= STEPS


def train_all(seeds: list[int], out_dir: Path, jobs: int) -> int:
    """Every (variant, seed) run not complete yet, `jobs` processes at a time, each with an equal share of
    the cores. Returns how many it trained."""
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [(v, s) for s in seeds for v in VARIANTS if not is_complete(out_dir / run_name(v, s))]
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "CUDA_VISIBLE_DEVICES": ""}
    running: list[tuple[str, subprocess.Popen]] = []
    trained = len(todo)
    while todo or running:
        while todo and len(running) < jobs:
            variant, seed = todo.pop(0)
            name = run_name(variant, seed)
            log = open(out_dir / f"{name}.log", "a")
            print(f"training {name} ({threads} thread(s)); log in {out_dir / (name + '.log')}", flush=True)
            running.append((name, subprocess.Popen(train_command(variant, seed, out_dir), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)))
        time.sleep(2)
        for name, proc in list(running):
            if proc.poll() is not None:
                running.remove((name, proc))
                if proc.returncode != 0:
                    sys.exit(f"error: {name} failed (exit {proc.returncode}): see {out_dir / (name + '.log')}")
    return trained


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    import torch

    return f"{os.cpu_count()} x {cpu}, {platform.system()} {platform.release()}, Python {platform.python_version()}, torch {torch.__version__}"


def mean_std(values: list[float | None]) -> str:
    """Mean ± sample std over the runs with a finite value (a diverged run logs none: it is named, not hidden)."""
    finite = [v for v in values if v is not None]
    missing = f" ({len(values) - len(finite)} run(s) without a finite value)" if len(finite) < len(values) else ""
    if len(finite) < 2:
        return (f"{finite[0]:.4f}" if finite else "—") + missing
    return f"{statistics.mean(finite):.4f} ± {statistics.stdev(finite):.4f}" + missing


def cell(value: float | None, fmt: str) -> str:
    return format(value, fmt) if value is not None else "—"


def report(seeds: list[int], out_dir: Path, doc: Path, plot_path: Path, training: str, command: str) -> str:
    from dist_gpt.tools.compare import markdown_table
    from dist_gpt.tools.plot import plot_runs
    from dist_gpt.tools.runs import read_run

    runs = {(v, s): read_run(out_dir / run_name(v, s)) for s in seeds for v in VARIANTS}
    final = {v: [runs[v, s].final_val for s in seeds] for v in VARIANTS}
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    plot_runs(list(runs.values()), plot_path, title=f"RoPE vs learned positions, CPU-sized seed-bible model ({len(seeds)} seeds each)")
    pairs = [r - l if r is not None and l is not None else None for r, l in zip(final["rope"], final["learned"])]
    lines = [
        BEGIN,
        f"Measured {time.strftime('%Y-%m-%d')} on {machine()}. {training}",
        "",
        "```bash",
        command,
        "```",
        "",
        "| variant | final val loss, mean ± std over seeds " + " ".join(f"| seed {s}" for s in seeds) + " |",
        "|---|---|" + "---|" * len(seeds),
        *(f"| {v} | {mean_std(final[v])} " + " ".join(f"| {cell(x, '.4f')}" for x in final[v]) + " |" for v in VARIANTS),
        f"| rope − learned (paired by seed) | {mean_std(pairs)} " + " ".join(f"| {cell(x, '+.4f')}" for x in pairs) + " |",
        "",
        f"![train and val loss of the {len(runs)} runs]({os.path.relpath(plot_path, doc.parent)})",
        "",
        "`python -m dist_gpt.compare " + " ".join(os.path.relpath(out_dir / run_name(v, s)) for s in seeds for v in VARIANTS) + "`:",
        "",
        markdown_table(list(runs.values())),
        END,
    ]
    block = "\n".join(lines)
    text = doc.read_text() if doc.is_file() else f"# Experiments\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        sys.exit(f"error: {doc} has no {BEGIN} ... {END} block to fill: add those two lines where the results go")
    head, rest = text.split(BEGIN, 1)
    doc.write_text(head + block + rest.split(END, 1)[1])
    return block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--out-dir", type=Path, default=REPO / "out" / "seed-cpu")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each gets cores / jobs threads)")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "experiments.md")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "seed_rope_vs_learned.png")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    if not (REPO / "data" / "bible-es" / "train.bin").is_file():
        sys.exit("error: data/bible-es is not prepared: run `python -m dist_gpt.prepare --config bible-tiny` first")
    command = "python benchmarks/seed_rope_vs_learned.py" + ("" if args.seeds == [1, 2, 3] else " --seeds " + " ".join(map(str, args.seeds)))
    load_start, start = os.getloadavg()[0], time.perf_counter()
    trained = train_all(args.seeds, args.out_dir, args.jobs)
    training = (
        f"This command trained {trained} run(s) in {(time.perf_counter() - start) / 60:.1f} min, {args.jobs} at a time; load average "
        f"{load_start:.1f} at the start and {os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} cores."
        if trained
        else "The runs were trained earlier (their wall times are in the table)."
    )
    print(report(args.seeds, args.out_dir, args.doc, args.plot, training, command))


if __name__ == "__main__":
    main()
