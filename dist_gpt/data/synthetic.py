"""A prepared data set of synthetic tokens, for runs that must not depend on a corpus: the doctor, the GPU
acceptance script, tests with a small vocabulary.

Uniformly random tokens would teach a model nothing (the loss stays at ln V), so comparisons between runs
(fp16 against bf16, a resume against a straight run) would compare noise. These tokens are a random sequence
of "phrases", each a fixed run of 4-16 token ids drawn once from a Zipf-like distribution: a model learns the
phrases quickly, so the loss falls well below ln V within tens of steps, and the files look exactly like
`dist_gpt.prepare`'s (uint16 train.bin / val.bin + meta.json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dist_gpt.data.loader import TOKEN_DTYPE
from dist_gpt.data.prepare import FORMAT_VERSION, META_FILE

GPT2_IDS = 50257


def synthetic_tokens(n_tokens: int, vocab_size: int = GPT2_IDS, n_phrases: int = 4096, seed: int = 0) -> np.ndarray:
    """n_tokens ids below vocab_size (uint16): phrases chosen at random, one after the other."""
    rng = np.random.default_rng(seed)
    zipf = 1.0 / np.arange(1, vocab_size + 1)
    ids = rng.permutation(vocab_size)  # frequent ids spread over the vocabulary, not only the low ones
    lengths = rng.integers(4, 17, n_phrases)
    phrases = np.split(ids[rng.choice(vocab_size, int(lengths.sum()), p=zipf / zipf.sum())], np.cumsum(lengths)[:-1])
    picks = rng.integers(0, n_phrases, n_tokens // 4 + 1)  # phrases are >= 4 tokens: always enough
    return np.concatenate([phrases[i] for i in picks])[:n_tokens].astype(TOKEN_DTYPE)


def write_synthetic_dataset(out_dir: str | Path, train_tokens: int, val_tokens: int = 0, vocab_size: int = GPT2_IDS, seed: int = 0) -> dict:
    """train.bin / val.bin / meta.json in out_dir, as `dist_gpt.prepare` writes them. Returns the meta dict."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    val_tokens = val_tokens or max(train_tokens // 20, 2048)
    tokens = synthetic_tokens(train_tokens + val_tokens, vocab_size, seed=seed)  # one phrase book for both splits
    tokens[:train_tokens].tofile(out_dir / "train.bin")
    tokens[train_tokens:].tofile(out_dir / "val.bin")
    meta = {
        "format": FORMAT_VERSION,
        "tokenizer": "synthetic",
        "source": f"synthetic:phrases(seed={seed}, vocab={vocab_size})",
        "vocab_size": vocab_size,
        "dtype": np.dtype(TOKEN_DTYPE).name,
        "train_tokens": train_tokens,
        "val_tokens": val_tokens,
        "max_token_id": int(tokens.max()),
    }
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic prepared data set: python -m dist_gpt.data.synthetic DIR")
    parser.add_argument("out_dir")
    parser.add_argument("--tokens", type=int, default=2_000_000, help="train tokens (val: 1/20 of it)")
    parser.add_argument("--vocab", type=int, default=GPT2_IDS, help="ids drawn below this (the model's vocab_size must be at least it)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    meta = write_synthetic_dataset(args.out_dir, args.tokens, vocab_size=args.vocab, seed=args.seed)
    print(f"synthetic data -> {args.out_dir}: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens, ids < {args.vocab}")


if __name__ == "__main__":
    main()
