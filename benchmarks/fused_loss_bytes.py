"""Bytes the chunked linear + cross-entropy moves per chunk, traced op by op (what a memory-bound GPU pays).

Every aten op of one chunk's forward + backward is seen by a TorchDispatchMode, which adds up the bytes of its
tensor inputs (read) and outputs (written): an in-place op reads and writes its tensor, an `out=` op writes it,
a view moves nothing. An op that reads or writes a chunk x V tensor is a pass over the chunk's logits.
Runs on CPU (the trace is the same ops a GPU runs eagerly); the GEMMs' operands (W: V x C) count once per use.

    python benchmarks/fused_loss_bytes.py                         # GPT-2 124M's shape, chunk 1024, bf16 autocast
    python benchmarks/fused_loss_bytes.py --dtype fp32 --json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dist_gpt.fused_loss import linear_cross_entropy

ALLOCATIONS = {"empty", "empty_like", "empty_strided", "zeros", "zeros_like", "new_empty", "new_zeros"}
SPARSE = {"gather", "index", "index_put_", "index_put", "scatter", "scatter_", "scatter_add_", "index_select"}


class ByteCounter(TorchDispatchMode):
    def __init__(self, logits_elements: int):
        super().__init__()
        self.logits_elements = logits_elements
        self.by_op: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # op -> [calls, bytes]
        self.logit_passes: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func._schema.is_mutable is False and any(a.alias_info for a in func._schema.returns):
            return out  # a view: no bytes move
        name = func.__name__
        written = kwargs.get("out")
        inputs = [t for t in tree_flatten((args, {k: v for k, v in kwargs.items() if k != "out"}))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if name.split(".")[0] in ALLOCATIONS:
            return out  # memory handed out, nothing read or written
        touched = inputs + outputs
        if name.split(".")[0] in SPARSE:
            # gather / index / index_put_ touch one element per row of a chunk x V tensor, not all of it
            touched = [t for t in touched if t.numel() < self.logits_elements]
        moved = sum(t.numel() * t.element_size() for t in touched)
        self.by_op[name][0] += 1
        self.by_op[name][1] += moved
        if any(t.numel() >= self.logits_elements for t in touched + ([written] if isinstance(written, torch.Tensor) else [])):
            self.logit_passes.append(name)
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024, help="one chunk")
    parser.add_argument("--n-embd", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="bf16: autocast, as training on a GPU")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, args.n_embd, generator=g).requires_grad_()
    weight = (torch.randn(args.vocab, args.n_embd, generator=g) * 0.02).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=g)
    counter = ByteCounter(args.tokens * args.vocab)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16"), counter:
        linear_cross_entropy(hidden, weight, targets, chunk_tokens=args.tokens).backward()
    total = sum(b for _, b in counter.by_op.values())
    result = {
        "shape": f"{args.tokens} tokens x V {args.vocab} x C {args.n_embd}, {args.dtype}",
        "bytes_per_chunk": total,
        "passes_over_logits": len(counter.logit_passes),
        "ops_over_logits": counter.logit_passes,
        "by_op": {k: {"calls": c, "bytes": b} for k, (c, b) in sorted(counter.by_op.items(), key=lambda kv: -kv[1][1])},
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{result['shape']}: {total / 1e9:.2f} GB moved per chunk, {len(counter.logit_passes)} ops touch a chunk x V tensor: {', '.join(counter.logit_passes)}")
    for name, (calls, moved) in sorted(counter.by_op.items(), key=lambda kv: -kv[1][1])[:12]:
        print(f"  {name:40s} {calls:3d} x  {moved / 1e6:10,.1f} MB")


if __name__ == "__main__":
    main()
