"""Checkpoint save/load cost on CPU: model + AdamW state (after one step, so the moments exist).

For each model shape (default: the seed model, 2 layers x 384 wide, and GPT-2 124M) it times
    checkpointer   Checkpointer.save / .load: DCP shards, RNG file, CRC32 of every file, manifest, atomic
                   rename and `latest`; load verifies the checksums, then DCP-loads into model and optimizer
    dcp            Strategy.save_checkpoint / load_checkpoint alone (torch.distributed.checkpoint)
    torch.save     torch.save of {model, optimizer} state dicts + fsync (DCP fsyncs too), and
                   torch.load(weights_only=True) + load_state_dict
and, with checkpoint.async_save, how long save() blocks the training loop (staging the state to CPU memory)
against a synchronous save; the longest poll() (called once per step: it publishes the save once written)
while the background write runs; and the time until the checkpoint is published.

MB/s is the checkpoint's size on disk over the time. The loads read files just written, from the page cache:
they measure deserialisation, checksums and copies, not the disk.

    python benchmarks/checkpoint_io.py                      # seed + gpt2, best of 2, ~2-5 minutes
    python benchmarks/checkpoint_io.py --models seed --repeats 5 --dir /mnt/fast
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

MODELS = {"seed": ["model.preset=seed"], "gpt2": ["model.preset=gpt2", "model.block_size=1024"]}


def build(model_name: str, out_dir: Path, async_save: bool = False):
    """A config, env, strategy (model + AdamW after one step) and a Checkpointer writing under out_dir."""
    from dist_gpt.checkpoint.checkpointer import Checkpointer
    from dist_gpt.config import load_config
    from dist_gpt.engine.build import build as build_training
    from dist_gpt.engine.step import train_step
    from dist_gpt.parallel import BatchShape
    from dist_gpt.runtime.distributed import init_distributed
    from dist_gpt.train.loop import TrainState

    overrides = MODELS[model_name] + [
        "train.device=cpu",
        "train.dtype=fp32",
        f"train.out_dir={out_dir}",
        f"train.run_name={model_name}",
        "checkpoint.keep_last_k=1",
        f"checkpoint.async_save={str(async_save).lower()}",
    ]
    config = load_config("bible-seed", overrides)
    env = init_distributed("cpu", "fp32")
    built = build_training(config, env, BatchShape(1, 1))
    strategy, model = built.strategy, built.model
    x = torch.randint(0, 50257, (1, 64))
    train_step(strategy, lambda: (x, x), grad_accum=1, grad_clip=1.0)
    state = TrainState(step=1)
    return config, env, strategy, Checkpointer(config, env, strategy, {"train_state": state}), model


def bench_model(model_name: str, root: Path, repeats: int) -> list[dict]:
    """The three ways, interleaved round after round (the disk's and the machine's load drift hits all of them
    alike); each time the best round."""
    import contextlib
    import io

    from dist_gpt.checkpoint.manifest import step_dir_name

    with contextlib.redirect_stdout(io.StringIO()):  # "checkpoint saved: ..." on every save
        config, env, strategy, ckpt, model = build(model_name, root)
    params = sum(p.numel() for p in model.parameters())
    steps = iter(range(1, 10_000))  # the Checkpointer skips a step it has already saved: a new one each time
    dcp_dir, pt = root / f"{model_name}-dcp", root / f"{model_name}.pt"

    def checkpointer_save() -> Path:
        step = next(steps)
        with contextlib.redirect_stdout(io.StringIO()):
            ckpt.save(step)  # keep_last_k=1: also deletes the previous one, as a run does
        return ckpt.root / step_dir_name(step)

    def dcp_save() -> Path:
        shutil.rmtree(dcp_dir, ignore_errors=True)
        dcp_dir.mkdir()
        strategy.save_checkpoint(dcp_dir)
        return dcp_dir

    def torch_save() -> Path:
        torch.save({"model": model.state_dict(), "optimizer": strategy.optimizer.state_dict()}, pt)
        with open(pt, "rb+") as f:
            os.fsync(f.fileno())  # DCP and the Checkpointer fsync their files too
        return pt

    def torch_load(path: Path) -> None:
        state = torch.load(path, weights_only=True)
        model.load_state_dict(state["model"])
        strategy.optimizer.load_state_dict(state["optimizer"])

    methods = {
        "checkpointer": (checkpointer_save, ckpt.load),
        "dcp": (dcp_save, lambda path: strategy.load_checkpoint(path, {})),
        "torch.save": (torch_save, torch_load),
    }
    times = {name: {"save": [], "load": []} for name in methods}
    sizes = {}
    for _ in range(repeats):
        for name, (save, load) in methods.items():
            start = time.perf_counter()
            path = save()
            times[name]["save"].append(time.perf_counter() - start)
            sizes[name] = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
            start = time.perf_counter()
            load(path)
            times[name]["load"].append(time.perf_counter() - start)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    return [dict(model=model_name, params=params, method=name, bytes=sizes[name], save=min(t["save"]), load=min(t["load"])) for name, t in times.items()]


def bench_async(model_name: str, root: Path, repeats: int) -> list[dict]:
    """How long save() blocks the loop: sync (the whole save) vs async (staging), and the async write's tail."""
    import contextlib
    import io

    rows = []
    for async_save in (False, True):
        with contextlib.redirect_stdout(io.StringIO()):
            config, env, strategy, ckpt, model = build(model_name, root / ("async" if async_save else "sync"), async_save)
        blocked, publish_stall, published = [], [], []
        for s in range(1, repeats + 1):
            with contextlib.redirect_stdout(io.StringIO()):
                start = time.perf_counter()
                ckpt.save(s)
                blocked.append(time.perf_counter() - start)
                longest_poll = 0.0
                while ckpt.pending is not None:  # the loop's once-per-step agreement, publishing when written
                    t = time.perf_counter()
                    ckpt.agree_on_step(s)
                    longest_poll = max(longest_poll, time.perf_counter() - t)
                    time.sleep(0.01)  # stands in for a training step
                publish_stall.append(longest_poll)
                published.append(time.perf_counter() - start)
        rows.append(dict(model=model_name, mode="async" if async_save else "sync", blocked=min(blocked), poll=min(publish_stall), published=min(published)))
        shutil.rmtree(root / ("async" if async_save else "sync"), ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="seed,gpt2", help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--repeats", type=int, default=2, help="best of N for each measurement")
    parser.add_argument("--async-model", default="gpt2", help="the model for the async-save stall ('' to skip)")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")

    root = Path(tempfile.mkdtemp(prefix="ckpt_io_", dir=args.dir))
    try:
        rows = [row for name in args.models.split(",") if name for row in bench_model(name, root, args.repeats)]
        async_rows = bench_async(args.async_model, root, args.repeats) if args.async_model else []
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {args.repeats}; dir {args.dir or tempfile.gettempdir()}")
    print(f"{'model':6} {'params':>8} {'method':13} {'size MB':>8} {'save s':>8} {'save MB/s':>10} {'load s':>8} {'load MB/s':>10}")
    for r in rows:
        mb = r["bytes"] / 1e6
        print(f"{r['model']:6} {r['params'] / 1e6:7.1f}M {r['method']:13} {mb:8.1f} {r['save']:8.3f} {mb / r['save']:10.0f} {r['load']:8.3f} {mb / r['load']:10.0f}")
    if async_rows:
        print()
        print(f"{'model':6} {'save':6} {'save() blocks s':>16} {'poll() blocks s':>16} {'until published s':>18}")
        for r in async_rows:
            print(f"{r['model']:6} {r['mode']:6} {r['blocked']:16.3f} {r['poll']:16.3f} {r['published']:18.3f}")


if __name__ == "__main__":
    main()
