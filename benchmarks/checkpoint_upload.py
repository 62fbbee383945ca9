"""checkpoint.remote: how long a checkpoint takes to reach the store, and how much the training steps slow down
while it uploads in the background.

For each model (default: the seed model and GPT-2 124M; model + AdamW state after one step) it saves one
checkpoint through the Checkpointer with checkpoint.remote set (the real path: publish, then each rank's upload
thread, the manifest last, the remote `latest`), then runs training steps of that model until the upload is done,
and as many again with nothing uploading. Reported: the checkpoint's size, the upload time (publish to remote
`latest`) and MB/s, and the median step time during the upload against after it.

The store is moto's S3 server on 127.0.0.1 by default (started here; it runs on the same CPUs and keeps the
objects in its own memory/temp files, so its work is part of the slowdown measured: a real bucket would cost the
trainer less CPU and more network time), or any URL given with --remote (credentials from the environment).

    python benchmarks/checkpoint_upload.py                          # seed + gpt2 to a local S3 server, ~2 min
    python benchmarks/checkpoint_upload.py --models seed --remote s3://my-bucket/bench
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from checkpoint_io import MODELS  # the same model shapes as the save/load benchmark

BATCH = (1, 128)  # sequences x tokens of each timed step: small, so a GPT-2 step on CPU stays ~1 s


def bench(model_name: str, remote: str, out_dir: Path) -> dict:
    from dist_gpt.checkpoint.checkpointer import Checkpointer
    from dist_gpt.config import load_config
    from dist_gpt.engine.build import build
    from dist_gpt.engine.step import train_step
    from dist_gpt.parallel import BatchShape
    from dist_gpt.runtime.distributed import init_distributed
    from dist_gpt.train.loop import TrainState

    overrides = MODELS[model_name] + ["train.device=cpu", "train.dtype=fp32", f"train.out_dir={out_dir}", f"train.run_name={model_name}", f"checkpoint.remote={remote}"]
    config = load_config("bible-seed", overrides)
    env = init_distributed("cpu", "fp32")
    built = build(config, env, BatchShape(BATCH[0], 1))
    x = torch.randint(0, 50257, BATCH)

    def step() -> float:
        start = time.perf_counter()
        train_step(built.strategy, lambda: (x, x), grad_accum=1, grad_clip=1.0)
        return time.perf_counter() - start

    step()
    ckpt = Checkpointer(config, env, built.strategy, {"train_state": TrainState(step=1)})
    with contextlib.redirect_stdout(io.StringIO()):
        ckpt.resume()  # opens (and checks) the store
        step()
        ckpt.save(1)
    name = "step_000001"
    size = sum(p.stat().st_size for p in (ckpt.root / name).rglob("*") if p.is_file())
    uploader = ckpt.remote.uploader
    during = []
    with contextlib.redirect_stdout(io.StringIO()):
        while uploader.uploaded != name:
            during.append(step())
            if uploader.error:
                raise RuntimeError(f"upload failed: {uploader.error}")
    upload_seconds = uploader.longest_seconds
    after = [step() for _ in range(max(3, len(during)))]
    ckpt.remote.finish(0)
    return dict(model=model_name, bytes=size, upload=upload_seconds, steps=len(during), during=statistics.median(during), after=statistics.median(after))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="seed,gpt2", help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--remote", default="", help="a store URL (default: a moto S3 server started on 127.0.0.1)")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    server = None
    if not args.remote:
        from s3_server import BUCKET, S3Server

        server = S3Server().start()
        server.create_bucket()
        os.environ.update(server.env())
        args.remote = f"s3://{BUCKET}/bench"
    try:
        with tempfile.TemporaryDirectory(prefix="ckpt_upload_") as out:
            rows = [bench(name, args.remote, Path(out)) for name in args.models.split(",") if name]
    finally:
        if server:
            server.stop()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; store {args.remote}{' (moto on 127.0.0.1)' if server else ''}; steps of {BATCH[0]}x{BATCH[1]} tokens")
    print(f"{'model':6} {'size MB':>8} {'upload s':>9} {'MB/s':>6} {'steps':>6} {'step s during':>14} {'step s after':>13} {'slowdown':>9}")
    for r in rows:
        mb = r["bytes"] / 1e6
        print(f"{r['model']:6} {mb:8.1f} {r['upload']:9.2f} {mb / r['upload']:6.0f} {r['steps']:6d} {r['during']:14.3f} {r['after']:13.3f} {r['during'] / r['after'] - 1:+9.0%}")


if __name__ == "__main__":
    main()
