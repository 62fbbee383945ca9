"""Score a model on a benchmark: `python -m dist_gpt.evaluate out/bible-tiny --task hellaswag [--limit 1000]`.

MODEL is a run dir, checkpoints dir or step_* dir (any strategy's), an exported .safetensors, an `export --hf`
directory, or a Hugging Face GPT-2 (a directory, or gpt2 ... gpt2-xl: downloaded once; OpenAI's GPT-2 124M
should score acc_norm 29.55 %). HellaSwag's validation file is downloaded into ~/.cache/dist_gpt/hellaswag
on first use; --data reads a local copy. acc_norm is the reproductions' (mean loss per ending token), not
lm-evaluation-harness's (per byte): see dist_gpt/eval/hellaswag.py.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dist_gpt.errors import cli
from dist_gpt.eval import hellaswag
from dist_gpt.interop import load_model
from dist_gpt.runtime.distributed import pick_device


@cli
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="MODEL", help="run dir, checkpoint, .safetensors, export --hf dir, HF GPT-2 dir or gpt2 name")
    parser.add_argument("--task", default="hellaswag", choices=["hellaswag"])
    parser.add_argument("--data", default="", help="a local hellaswag_val.jsonl (default: download it once into the cache)")
    parser.add_argument("--limit", type=int, default=0, help="score the first N items only (0 = all 10,042)")
    parser.add_argument("--batch-size", type=int, default=hellaswag.DEFAULT_BATCH_ITEMS, help="items per forward (4 endings each)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = parser.parse_args(argv)

    device = pick_device(args.device, 0)
    items = hellaswag.read_items(hellaswag.data_file(args.data), args.limit)
    model = load_model(args.model).to(device).eval()  # any format; OpenAI's GPT-2 with its own learned positions
    start = time.perf_counter()
    with torch.no_grad():
        scores = hellaswag.score(model, items, model.config.block_size, model.config.tokenizer_vocab_size, device, batch_items=max(1, args.batch_size), progress=True)
    seconds = time.perf_counter() - start
    result = {**scores.record(args.task), "seconds": round(seconds, 3), "model": args.model}
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{args.task}: acc {100 * scores.acc:.2f}% | acc_norm {100 * scores.acc_norm:.2f}% (mean loss per ending token) | "
            f"{scores.items:,} items in {seconds:.1f} s ({1000 * seconds / scores.items:.1f} s per 1,000 items) | chance 25%"
        )
    return result


if __name__ == "__main__":
    main()
