"""Generate text from a checkpoint or an export: `python -m dist_gpt.sample --ckpt out/bible-tiny --prompt "En el principio"`.

Tokens are printed as they are generated."""

from __future__ import annotations

import argparse
import codecs

import torch

from dist_gpt import tokenizer
from dist_gpt.errors import cli
from dist_gpt.interop import load_model
from dist_gpt.runtime.distributed import pick_device


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ckpt", required=True, help="run dir (also in object storage: s3://bucket/prefix/RUN), checkpoints dir, step_* dir, an exported .safetensors or `export --hf` dir, or a GPT-2 (name or HF dir)")
    parser.add_argument("--prompt", default="\n")
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    device = pick_device(args.device, 0)
    model = load_model(args.ckpt).to(device).eval()
    torch.manual_seed(args.seed)
    prompt = torch.tensor([tokenizer.encode(args.prompt)], dtype=torch.long, device=device)
    for i in range(args.num_samples):
        print(args.prompt, end="", flush=True)
        # A token may end in the middle of a UTF-8 character: the incremental decoder holds such bytes back.
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        steps = model.generate_steps(prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k)
        next(steps)  # the prompt itself, printed above
        for ids in steps:
            print(utf8.decode(tokenizer.decode_bytes(ids[0, -1:].tolist())), end="", flush=True)
        print(utf8.decode(b"", final=True))
        if i + 1 < args.num_samples:
            print("-" * 40)


if __name__ == "__main__":
    main()
