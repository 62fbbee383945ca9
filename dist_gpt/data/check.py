"""Prepared data checked at the door, before a model is built: a problem found here costs a second, not the
hours a run would train before an eval or a resume trips over it. Each problem is one line with the fix."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dist_gpt.data.loader import TOKEN_DTYPE
from dist_gpt.data.prepare import SPLITS, bin_path, read_meta
from dist_gpt.errors import UserError


def check_prepared_data(data_dir: str | Path, block_size: int, vocab_size: int, prepare: str = "") -> dict:
    """meta.json of `data_dir` once train.bin/val.bin agree with it, each holds a window, and the token ids fit
    the model's vocabulary. Token counts come from meta.json and file sizes: nothing is read from the bins."""
    data_dir = Path(data_dir)
    meta = read_meta(data_dir, prepare)  # prepare: the command to suggest when there is no data
    redo = f"re-run python -m dist_gpt.prepare --dataset {meta.get('source', 'SPEC')} --out {data_dir} --force"
    dtype = np.dtype(meta.get("dtype", "uint16"))
    if dtype != TOKEN_DTYPE:
        raise UserError(f"{data_dir}/meta.json says the tokens are {dtype.name}, this code reads {np.dtype(TOKEN_DTYPE).name}: {redo}")
    for split in SPLITS:
        path, tokens = bin_path(data_dir, split), int(meta[f"{split}_tokens"])
        if not path.is_file():
            raise UserError(f"{path} is missing (meta.json lists {tokens:,} tokens): {redo}")
        size, expected = path.stat().st_size, tokens * dtype.itemsize
        if size != expected:
            raise UserError(f"{path} is {size:,} bytes but meta.json says {tokens:,} {dtype.name} tokens = {expected:,} bytes (truncated or replaced?): {redo}")
        if tokens < block_size + 1:
            more = "with a larger --val-fraction" if split == "val" else "on more text"
            raise UserError(f"{path} holds {tokens:,} tokens, less than one window of model.block_size+1 = {block_size + 1}: lower model.block_size, or {redo} {more}")
    check_vocabulary(meta, vocab_size, data_dir, redo)
    return meta


def check_vocabulary(meta: dict, vocab_size: int, data_dir: Path, redo: str) -> None:
    """The largest token id must index the model's embedding. A meta.json from before max_token_id was
    recorded is trusted as far as its tokenizer's vocabulary goes (no id can exceed it): scanning a
    multi-GB train.bin at every start would cost more than the check is worth."""
    largest = meta.get("max_token_id")
    if largest is None:
        tokenizer_vocab = int(meta.get("vocab_size", 0))
        if tokenizer_vocab and tokenizer_vocab <= vocab_size:
            return
        raise UserError(
            f"model.vocab_size={vocab_size} is smaller than the vocabulary of the tokenizer that prepared {data_dir} ({tokenizer_vocab or 'unknown'}), "
            f"and its meta.json predates the record of the largest token id: {redo} to record it (or raise model.vocab_size)"
        )
    if largest >= vocab_size:
        raise UserError(
            f"{data_dir} holds token id {largest:,}, outside the model's vocabulary (model.vocab_size={vocab_size}): it was tokenized "
            f"for another vocabulary; {redo} (GPT-2's 50257 ids), or set model.vocab_size above {largest}"
        )
