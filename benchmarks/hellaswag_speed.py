"""HellaSwag's scoring time per 1,000 items on this machine, for a model shape (default: bible-tiny's).

The real validation file cannot be fetched everywhere, so the items are synthetic in its format and of its
typical size (a context of ~45 words, endings of ~20): the time depends on the token counts and the model's
shape, not on the words. The model has random weights for the same reason. Runs `dist_gpt.evaluate`'s scorer
at several batch sizes (items per forward; 4 endings each).

    python benchmarks/hellaswag_speed.py --items 1000 --batch 1 4 16
    python benchmarks/hellaswag_speed.py --config gpt2-124m-fineweb-edu --items 200
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from dist_gpt.config import load_config
from dist_gpt.distributed import pick_device
from dist_gpt.eval import hellaswag
from dist_gpt.model import GPT


def write_items(path: Path, count: int) -> None:
    rng = random.Random(0)
    words = "the man woman is are was then they it a of to and in on with his her into up down out ball water table".split()
    with open(path, "w") as f:
        for _ in range(count):
            context = " ".join(rng.choices(words, k=rng.randint(30, 60))).capitalize() + "."
            endings = [" ".join(rng.choices(words, k=rng.randint(12, 28))) + "." for _ in range(4)]
            f.write(json.dumps({"ctx": context, "endings": endings, "label": rng.randrange(4)}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="bible-tiny", help="the preset whose model shape to time")
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = pick_device(args.device, 0)
    model = GPT(load_config(args.config).model.gpt_config()).to(device).eval()
    with tempfile.TemporaryDirectory() as tmp:
        write_items(Path(tmp) / "items.jsonl", args.items)
        items = hellaswag.read_items(Path(tmp) / "items.jsonl")
    tokens = sum(len(i.context) + len(e) for i in items for e in i.endings)
    print(f"{args.config}: {model.num_params(non_embedding=False) / 1e6:.2f}M params, {args.items} items, {tokens / args.items / 4:.0f} tokens per row, "
          f"{device}, {torch.get_num_threads()} threads")  # fmt: skip
    for batch in args.batch:
        start = time.perf_counter()
        hellaswag.score(model, items, model.config.block_size, model.config.tokenizer_vocab_size, device, batch_items=batch)
        seconds = time.perf_counter() - start
        print(f"batch {batch:3d} items: {seconds:6.1f} s = {1000 * seconds / args.items:6.1f} s per 1,000 items", flush=True)


if __name__ == "__main__":
    main()
