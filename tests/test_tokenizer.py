"""The GPT-2 tokenizer builds offline, from the files shipped in dist_gpt/assets/gpt2."""

import hashlib
import socket

import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry

from dist_gpt import tokenizer


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """Every test builds the encoding afresh, with an empty tiktoken cache and every network path raising,
    so it can pass neither on files another process cached nor by downloading."""

    def no_network(*args, **kwargs):
        raise AssertionError("the tokenizer tried to use the network")

    real_read_file = tiktoken.load.read_file

    def read_local_file_only(blobpath):
        if blobpath.startswith(("http://", "https://")):
            no_network()
        return real_read_file(blobpath)

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.load, "read_file", read_local_file_only)
    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # tiktoken's own cache of built encodings
    tokenizer.gpt2_encoding.cache_clear()  # built next under these conditions
    yield
    tokenizer.gpt2_encoding.cache_clear()  # later users rebuild it without the patches


def test_known_ids():
    encoding = tokenizer.gpt2_encoding()
    assert tokenizer.encode("hello world") == [31373, 995]
    assert encoding.n_vocab == 50257
    assert encoding.eot_token == tokenizer.EOT_ID == 50256
    assert tokenizer.decode([31373, 995]) == "hello world"


def test_spanish_round_trips_exactly():
    text = "EN el principio crió Dios los cielos y la tierra.\n¿Señor, por qué? ¡Ñandú, pingüino, acción! «Año»  — 1909"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode_batch([text, "hello world"], num_threads=1) == [tokenizer.encode(text), [31373, 995]]


def test_literal_end_of_text_is_ordinary_text():
    ids = tokenizer.encode("a<|endoftext|>b")
    assert tokenizer.EOT_ID not in ids
    assert tokenizer.decode(ids) == "a<|endoftext|>b"


def test_shipped_files_are_the_ones_tiktoken_pins():
    for path, expected in zip(tokenizer.gpt2_files(), (tokenizer.VOCAB_BPE_SHA256, tokenizer.ENCODER_JSON_SHA256)):
        assert hashlib.sha256(path.read_bytes()).hexdigest() == expected, path


def test_the_network_guard_would_catch_a_download():
    """tiktoken's own "gpt2" encoding downloads the files: the guard must stop it, or the tests above prove
    nothing about working offline."""
    with pytest.raises(AssertionError, match="network"):
        tiktoken.get_encoding("gpt2")
