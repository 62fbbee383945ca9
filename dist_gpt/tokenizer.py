"""The GPT-2 BPE tokenizer (tiktoken), with no network.

`tiktoken.get_encoding("gpt2")` downloads two files on first use; training nodes often have no internet. We
ship those two files (OpenAI's GPT-2 `vocab.bpe` and `encoder.json`, see dist_gpt/assets/gpt2/LICENSE) as
package data and build the encoding from them, checked against the sha256 hashes tiktoken itself pins. The
Hugging Face export copies the same files (see `gpt2_files`).
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
# The hashes tiktoken itself pins for the GPT-2 files (tiktoken_ext/openai_public.py).
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# GPT-2's pre-tokenisation pattern (the r50k_base / gpt2 pattern).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def gpt2_files() -> tuple[Path, Path]:
    """(vocab.bpe, encoder.json) as shipped in the package. They are Hugging Face's merges.txt and vocab.json:
    the same BPE merges (one "a b" pair a line after a "#version" header) and the same token -> id map."""
    data = resources.files("dist_gpt") / "assets" / "gpt2"
    return Path(str(data / "vocab.bpe")), Path(str(data / "encoder.json"))


@functools.lru_cache(maxsize=1)
def gpt2_encoding() -> tiktoken.Encoding:
    """The GPT-2 encoding from the shipped files; tiktoken checks their hashes (ValueError if they differ)."""
    vocab_bpe, encoder_json = gpt2_files()
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(vocab_bpe),
        encoder_json_file=str(encoder_json),
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


def decode_bytes(ids: list[int]) -> bytes:
    """The raw bytes of ids: a token may hold part of a UTF-8 character, so streams decode bytes incrementally."""
    return gpt2_encoding().decode_bytes(ids)
