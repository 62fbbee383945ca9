"""Two versions of dist_gpt/fused_loss.py against each other, interleaved in one process (CPU).

    git show OLD_COMMIT:dist_gpt/fused_loss.py > /tmp/old_fused.py
    python benchmarks/fused_loss_ab.py /tmp/old_fused.py dist_gpt/fused_loss.py

Forward + backward of bible-seed's output layer (2,048 tokens x V 50,304 x C 384, chunk 1,024), in fp32 and under
bf16 autocast, the two alternated so a busy moment hits both; median of 6 after one warm-up round.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time

import torch


def load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(old_path: str, new_path: str) -> None:
    versions = {"old": load(old_path, "old_fused"), "new": load(new_path, "new_fused")}
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2048, 384, generator=g).requires_grad_()
    weight = (torch.randn(50304, 384, generator=g) * 0.02).requires_grad_()
    targets = torch.randint(0, 50257, (2048,), generator=g)
    for dtype in ("fp32", "bf16"):
        times = {name: [] for name in versions}
        for round_ in range(7):
            for name, module in versions.items():
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                    start = time.perf_counter()
                    module.linear_cross_entropy(hidden, weight, targets, chunk_tokens=1024).backward()
                    seconds = time.perf_counter() - start
                hidden.grad = weight.grad = None
                if round_:
                    times[name].append(seconds)
        old, new = (statistics.median(times[name]) for name in ("old", "new"))
        print(f"{dtype}: old {1e3 * old:.0f} ms ({2048 / old:,.0f} tok/s), new {1e3 * new:.0f} ms ({2048 / new:,.0f} tok/s): x{old / new:.2f}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
