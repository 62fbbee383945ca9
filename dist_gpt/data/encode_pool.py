"""Tokenizing batches of documents on every core, in order, with flat memory.

Where the time goes (docs/benchmarks.md, "prepare at the speed of the machine"): tokenizing is ~85 % of a
prepare on one core; reading JSONL/Parquet, hashing a document for its split and turning token lists into
arrays is the rest, and in the old design all of that rest ran in one Python thread holding the GIL while
tiktoken's threads tokenized. Here each batch goes whole to a worker PROCESS that tokenizes it (one
document at a time: no tiktoken thread pool, whose default thread count stalls, tiktoken #530), hashes every
document and returns numpy arrays; the main process only reads documents and appends arrays to files.

- In order: batches are written in the order they were read, whatever finishes first, so the token files are
  byte-identical at every process count.
- Flat memory: at most 2 batches per process are in flight (Pool.imap would read the whole dataset ahead).
"""

from __future__ import annotations

import hashlib
import itertools
import multiprocessing
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from dist_gpt.tokenizer import EOT_ID, gpt2_encoding

TOKEN_DTYPE = np.uint16  # GPT-2's 50,257 ids fit; half the disk of int32
IN_FLIGHT_PER_PROCESS = 2


@dataclass
class EncodedBatch:
    """A batch's documents, tokenized: every document's ids followed by the end-of-text id, concatenated."""

    ids: np.ndarray  # uint16, all documents in order
    lengths: np.ndarray  # int64, tokens per document (its end-of-text included)
    positions: np.ndarray  # float64, where each document falls in [0, 1) (split_position)

    def first(self, documents: int) -> EncodedBatch:
        """The batch cut after its first `documents` documents."""
        return EncodedBatch(self.ids[: int(self.lengths[:documents].sum())], self.lengths[:documents], self.positions[:documents])


def split_position(text: str) -> float:
    """Where a document falls in [0, 1): a hash of its text, the same on every machine and in every run."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def encode_documents(texts: list[str]) -> EncodedBatch:
    """The work of one batch (run in a worker process)."""
    encoding = gpt2_encoding()
    token_lists = [encoding.encode_ordinary(text) for text in texts]
    lengths = np.fromiter((len(ids) + 1 for ids in token_lists), dtype=np.int64, count=len(texts))
    ids = np.empty(int(lengths.sum()), dtype=TOKEN_DTYPE)
    end = 0
    for tokens, length in zip(token_lists, lengths.tolist()):
        ids[end : end + length - 1] = tokens
        ids[end + length - 1] = EOT_ID
        end += length
    positions = np.fromiter((split_position(text) for text in texts), dtype=np.float64, count=len(texts))
    return EncodedBatch(ids, lengths, positions)


def encoded_batches(batches: Iterable[list[str]], processes: int) -> Iterator[EncodedBatch]:
    """encode_documents(batch) for every batch, in order, computed by `processes` worker processes. With one
    process, or a dataset of one batch (a small one), it all runs here: a pool would only add its start-up."""
    batches = iter(batches)
    first, second = next(batches, None), next(batches, None)
    if processes == 1 or second is None:
        for batch in (b for b in (first, second) if b is not None):
            yield encode_documents(batch)
        for batch in batches:
            yield encode_documents(batch)
        return
    # fork (Linux): workers start in milliseconds with the tokenizer already loaded; elsewhere the platform's default
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)
    gpt2_encoding()  # loaded once here, inherited by forked workers
    with context.Pool(processes) as pool:
        pending: deque = deque()
        for batch in itertools.chain((first, second), batches):
            pending.append(pool.apply_async(encode_documents, (batch,)))
            if len(pending) >= IN_FLIGHT_PER_PROCESS * processes:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
