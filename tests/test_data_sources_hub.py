"""Hub datasets fail in one line (datasets' own refusal of a loading script, provoked offline, and the Parquet
fallback it triggers); data.max_tokens stops a prepare; prepare's output is the same at every thread count."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import assert_one_line_error

from dist_gpt.data import prepare_dataset
from dist_gpt.data.sources import PARQUET_REVISION
from dist_gpt.tools.prepare import main as prepare_main

pytestmark = pytest.mark.usefixtures("offline_data")


def test_a_loading_script_is_refused_by_datasets_then_its_parquet_conversion_is_tried_all_in_one_line(tmp_path, capsys):
    """A local dataset folder holding openwebtext.py: datasets >= 4 refuses it with its RuntimeError, as it
    refuses Skylion007/openwebtext on the Hub. We say so, try the refs/convert/parquet revision (which a local
    folder does not have, so that fails too here) and end in one line, never a traceback."""
    folder = tmp_path / "openwebtext"
    folder.mkdir()
    (folder / "openwebtext.py").write_text("import datasets\n")
    with pytest.raises(SystemExit) as e:
        prepare_main(["--dataset", f"hf:{folder}", "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert "is a dataset with a loading script, which datasets" in out and f"revision {PARQUET_REVISION}" in out
    assert_one_line_error(e.value.code, err, f"cannot load Hugging Face dataset '{folder}'", f"nor its Parquet conversion ({PARQUET_REVISION})", "Dataset scripts are no longer supported")
    assert not (tmp_path / "out" / "meta.json").exists()


@pytest.mark.parametrize("spec", ["hf:nobody/no-such-dataset", "hf:{tmp}/empty-folder"])
def test_any_other_datasets_failure_is_one_line(tmp_path, capsys, spec):
    (tmp_path / "empty-folder").mkdir()
    with pytest.raises(SystemExit) as e:
        prepare_main(["--dataset", spec.format(tmp=tmp_path), "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert "loading script" not in out
    assert_one_line_error(e.value.code, err, "cannot load Hugging Face dataset", "offline, give local .txt/.jsonl/.parquet files instead")


def write_corpus(path, documents: int = 400):
    with open(path, "w") as f:
        for i in range(documents):
            f.write(json.dumps({"text": f"Document number {i}. " + "The quick brown fox jumps over the lazy dog. " * (1 + i % 7)}) + "\n")
    return path


def test_max_tokens_stops_after_the_document_that_reaches_it(tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl")
    full = prepare_dataset(str(corpus), tmp_path / "full", val_fraction=0.1)
    total = full["train_tokens"] + full["val_tokens"]
    limited = prepare_dataset(str(corpus), tmp_path / "limited", val_fraction=0.1, max_tokens=2000)
    got = limited["train_tokens"] + limited["val_tokens"]
    longest_document = 3 + 7 * 10 + 1  # "Document number i." + 7 sentences of 10 tokens + end-of-text, at most
    assert 2000 <= got < 2000 + longest_document < total and limited["max_tokens"] == 2000
    # the kept documents are the first ones of the stream, whole: train.bin is a prefix of the full train.bin
    full_train, limited_train = (np.fromfile(tmp_path / d / "train.bin", dtype=np.uint16) for d in ("full", "limited"))
    assert np.array_equal(limited_train, full_train[: len(limited_train)])
    again = prepare_dataset(str(corpus), tmp_path / "limited", val_fraction=0.1, max_tokens=3000)  # a new limit redoes it
    assert again["train_tokens"] + again["val_tokens"] >= 3000
    assert "max_tokens" not in full  # a prepare without a limit records none (older meta.json stay up to date)
    cli = prepare_main(["--dataset", str(corpus), "--out", str(tmp_path / "cli"), "--val-fraction", "0.1", "--max-tokens", "2000"])
    assert (cli["train_tokens"], cli["val_tokens"]) == (limited["train_tokens"], limited["val_tokens"])


def test_the_fineweb_edu_preset_asks_the_hub_for_its_config(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # offline: the Hub is asked (and refuses) for that dataset
        prepare_main(["--config", "gpt2-124m-fineweb-edu", "--out", str(tmp_path / "out")])
    assert_one_line_error(e.value.code, capsys.readouterr().err, "cannot load Hugging Face dataset 'HuggingFaceFW/fineweb-edu' (config 'sample-10BT'")
    from dist_gpt.config import load_config

    config = load_config("gpt2-124m-fineweb-edu")
    assert config.data.dataset == "hf:HuggingFaceFW/fineweb-edu:sample-10BT" and config.train.eval_tasks == ["hellaswag"]
    assert config.train.global_batch_size * config.model.block_size == 524_288  # GPT-2 124M's ~0.5M tokens a step


@pytest.mark.parametrize("max_tokens", [0, 3000])
def test_prepare_writes_the_same_bytes_at_every_process_count(tmp_path, monkeypatch, max_tokens):
    """Many small batches spread over 1, 2 and 3 worker processes: the same train.bin, val.bin and meta.json
    (but for the timing and the process count), also when max_tokens cuts the stream mid-batch."""
    from dist_gpt.data import prepare as prepare_module

    monkeypatch.setattr(prepare_module, "BATCH_CHARS", 3000)  # ~30 batches: every worker gets several
    corpus = write_corpus(tmp_path / "c.jsonl", documents=300)
    metas = {n: prepare_dataset(str(corpus), tmp_path / f"p{n}", val_fraction=0.1, num_proc=n, max_tokens=max_tokens) for n in (1, 2, 3)}
    for n in (2, 3):
        for split in ("train", "val"):
            assert (tmp_path / f"p{n}" / f"{split}.bin").read_bytes() == (tmp_path / "p1" / f"{split}.bin").read_bytes()
        timing = {"created", "seconds", "tokens_per_s", "num_processes"}
        assert {k: v for k, v in metas[n].items() if k not in timing} == {k: v for k, v in metas[1].items() if k not in timing}
        assert metas[n]["num_processes"] == n
    assert metas[1]["val_documents"] > 0 and (not max_tokens or 3000 <= metas[1]["train_tokens"] + metas[1]["val_tokens"] < 3100)
