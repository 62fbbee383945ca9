"""The data pipeline on real files: SWORD reading, sources, prepare (split, meta, re-runs), the token loader."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_gpt.data import TokenLoader, prepare_dataset, read_chapters, read_meta, read_verses, sword
from dist_gpt.data import prepare as prepare_module
from dist_gpt.data.prepare import split_position
from dist_gpt.data.sources import open_source
from dist_gpt.errors import UserError
from dist_gpt.tokenizer import EOT_ID, decode, encode

pytestmark = pytest.mark.usefixtures("offline_data")


def split_documents(path: Path) -> list[str]:
    """The documents in a .bin: decoded text between end-of-text tokens (each document ends with one)."""
    ids = np.fromfile(path, dtype=np.uint16).tolist()
    assert ids and ids[-1] == EOT_ID
    documents, current = [], []
    for i in ids:
        if i == EOT_ID:
            documents.append(decode(current))
            current = []
        else:
            current.append(i)
    return documents


# ------------------------------------------------------------------------------------------ SWORD


def write_ztext_module(module_dir: Path, testaments: dict[str, list[str]], slots_per_block: int = 3) -> None:
    """A zText module from each testament's slots (raw OSIS markup, "" = empty slot), in the format FACTS.md
    describes: .bzs (offset, compressed size, size), .bzv (block, start, size), .bzz (zlib blocks)."""
    module_dir.mkdir(parents=True, exist_ok=True)
    for testament, slots in testaments.items():
        blocks, verse_index = [], b""
        for first in range(0, len(slots), slots_per_block):
            block = b""
            for markup in slots[first : first + slots_per_block]:
                data = markup.encode()
                verse_index += struct.pack("<IIH", len(blocks), len(block) if data else 0, len(data))
                block += data
            blocks.append(block)
        block_index, compressed = b"", b""
        for block in blocks:
            packed = zlib.compress(block)
            block_index += struct.pack("<III", len(compressed), len(packed), len(block))
            compressed += packed
        (module_dir / f"{testament}.bzs").write_bytes(block_index)
        (module_dir / f"{testament}.bzv").write_bytes(verse_index)
        (module_dir / f"{testament}.bzz").write_bytes(compressed)


SYNTHETIC_OT = [
    "",  # module heading
    '<milestone type="x-importer" subType="x-osis2mod" n="$Rev: 3769 $"/>',  # testament heading
    '<div osisID="Gen" sID="b1" type="book"/> <title level="1" type="main">Génesis</title> <div sID="p1" type="x-p"/>',
    '<chapter n="1" osisID="Gen.1" sID="Gen.1"/>',
    '<w lemma="strong:H7225">EN el principio</w> <w lemma="strong:H1254">crió</w> Dios.',
    '<w>Y la tierra</w>  estaba\n desordenada<note type="x-footnote">una nota que no es texto</note>.',
    "",  # an empty verse
    'Dios &amp; la luz: &lt;sea&gt; &#233;l. <chapter eID="Gen.1"/><div eID="p1" type="x-p"/>',
    '<div sID="p2" type="x-p"/><chapter n="2" osisID="Gen.2" sID="Gen.2"/>',
    '<title type="psalm" canonical="true">Salmo de David.</title><transChange type="added">Y</transChange> fueron acabados.',
]
SYNTHETIC_NT = [
    "",
    "<milestone/>",
    '<div osisID="Matt" sID="b2" type="book"/><title>San Mateo</title>',
    '<chapter n="1" osisID="Matt.1" sID="Matt.1"/>',
    "LIBRO de la generación.",
    "Abraham engendró á Isaac.",
]
SYNTHETIC_VERSES = [
    "EN el principio crió Dios.",
    "Y la tierra estaba desordenada.",
    "Dios & la luz: <sea> él.",
    "Y fueron acabados.",
    "LIBRO de la generación.",
    "Abraham engendró á Isaac.",
]


def test_sword_reader_strips_markup_and_groups_chapters(tmp_path):
    write_ztext_module(tmp_path / "mod", {"ot": SYNTHETIC_OT, "nt": SYNTHETIC_NT})
    assert read_verses(tmp_path / "mod") == SYNTHETIC_VERSES
    assert read_chapters(tmp_path / "mod") == ["\n".join(SYNTHETIC_VERSES[:3]), SYNTHETIC_VERSES[3], "\n".join(SYNTHETIC_VERSES[4:])]


def test_sword_without_chapter_tags_gives_one_verse_per_document(tmp_path):
    write_ztext_module(tmp_path / "mod", {"nt": ["", "", "Uno.", "<w>Dos</w>.", "", "Tres."]}, slots_per_block=2)
    assert read_chapters(tmp_path / "mod") == ["Uno.", "Dos.", "Tres."]


def test_missing_module_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(sword, "BIBLE_ES_MODULE", tmp_path / "spaRV1909eb")
    with pytest.raises(UserError, match="apt-get install sword-text-sparv"):
        open_source("bible-es")
    with pytest.raises(UserError, match="no SWORD zText module"):
        read_verses(tmp_path / "elsewhere")


@pytest.mark.skipif(not sword.BIBLE_ES_MODULE.is_dir(), reason="the Debian package sword-text-sparv is not installed")
def test_real_spanish_bible_matches_the_facts():
    chapters = sword.read_chapter_verses()
    verses = [verse for chapter in chapters for verse in chapter]
    text = "".join(v + "\n" for v in verses)
    assert len(verses) == 31_084
    assert len(text.encode()) == 3_938_489
    assert len(encode(text)) == 1_499_253
    assert text.startswith("EN el principio crió Dios los cielos y la tierra.")
    assert len(chapters) == 1_189  # KJV versification: 929 OT + 260 NT chapters
    assert [len(c) for c in chapters[:3]] == [31, 25, 24]  # Genesis 1-3


# ------------------------------------------------------------------------------------------ prepare

PARAGRAPHS = [f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i} times.\nA second line {i}." for i in range(40)]


def write_txt(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "a.txt").write_text("\n\n".join(PARAGRAPHS[:25]) + "\n")
    (directory / "b.txt").write_text("\n   \n\n".join(PARAGRAPHS[25:]))  # whitespace-only lines separate too
    return directory


def test_prepare_txt_splits_by_document_and_writes_meta(tmp_path):
    meta = prepare_dataset(str(write_txt(tmp_path / "txt") / "*.txt"), tmp_path / "out", val_fraction=0.25, num_proc=2)
    train, val = split_documents(tmp_path / "out" / "train.bin"), split_documents(tmp_path / "out" / "val.bin")
    assert sorted(train + val) == sorted(PARAGRAPHS)
    assert val == [p for p in PARAGRAPHS if split_position(p) < 0.25]  # in order, chosen by content hash
    assert 0 < len(val) < len(PARAGRAPHS)
    assert meta == read_meta(tmp_path / "out")
    assert meta["train_tokens"] == os.path.getsize(tmp_path / "out" / "train.bin") // 2
    assert meta["val_tokens"] == os.path.getsize(tmp_path / "out" / "val.bin") // 2
    assert (meta["train_documents"], meta["val_documents"]) == (len(train), len(val))
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_id"], meta["dtype"]) == ("gpt2", 50257, EOT_ID, "uint16")
    assert meta["val_fraction"] == 0.25 and meta["input_files"] == 2 and len(meta["input_sha256"]) == 64
    assert meta["tokens_per_s"] > 0 and "paragraph" in meta["document"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_prepare_is_deterministic_whatever_the_batching(tmp_path, monkeypatch):
    write_txt(tmp_path / "txt")
    prepare_dataset(str(tmp_path / "txt"), tmp_path / "one", val_fraction=0.25)
    monkeypatch.setattr(prepare_module, "BATCH_CHARS", 200)  # many small batches stream through the pipeline
    prepare_dataset(str(tmp_path / "txt"), tmp_path / "two", val_fraction=0.25, num_proc=1)
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_rerun_does_nothing_unless_inputs_settings_or_force_change(tmp_path, capsys):
    source = write_txt(tmp_path / "txt")
    out = tmp_path / "out"
    first = prepare_dataset(str(source), out, val_fraction=0.25)
    assert prepare_dataset(str(source), out, val_fraction=0.25)["created"] == first["created"]
    assert "up to date" in capsys.readouterr().out
    assert "up to date" not in _run_and_capture(capsys, lambda: prepare_dataset(str(source), out, val_fraction=0.25, force=True))
    assert "up to date" not in _run_and_capture(capsys, lambda: prepare_dataset(str(source), out, val_fraction=0.5))
    (source / "b.txt").write_text("New text.\n\nAnd more.")
    meta = prepare_dataset(str(source), out, val_fraction=0.5)
    assert meta["train_documents"] + meta["val_documents"] == 27


def _run_and_capture(capsys, action) -> str:
    action()
    return capsys.readouterr().out


@pytest.mark.parametrize("batch_chars", [1, prepare_module.BATCH_CHARS])
def test_tiny_input_still_gets_a_val_document(tmp_path, monkeypatch, batch_chars):
    monkeypatch.setattr(prepare_module, "BATCH_CHARS", batch_chars)
    (tmp_path / "t.txt").write_text("One.\n\nTwo.\n\nThree.\n")
    meta = prepare_dataset(str(tmp_path / "t.txt"), tmp_path / "out", val_fraction=0.001)
    val = split_documents(tmp_path / "out" / "val.bin")
    assert (meta["train_documents"], meta["val_documents"]) == (2, 1)
    assert val == [min(["One.", "Two.", "Three."], key=split_position)]  # the document nearest the threshold
    assert val == ["Two."] and split_documents(tmp_path / "out" / "train.bin") == ["One.", "Three."]  # cut from the middle
    assert meta["val_tokens"] + meta["train_tokens"] == sum(len(encode(d)) + 1 for d in ["One.", "Two.", "Three."])


def test_single_document_is_refused(tmp_path):
    (tmp_path / "t.txt").write_text("Only one paragraph.\nWith two lines.\n")
    with pytest.raises(UserError, match="needs at least 2"):
        prepare_dataset(str(tmp_path / "t.txt"), tmp_path / "out")


def test_prepare_jsonl_uses_text_field_and_reports_bad_lines(tmp_path):
    rows = [{"id": i, "content": f"Document number {i}."} for i in range(20)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    meta = prepare_dataset(str(path), tmp_path / "out", val_fraction=0.2, text_field="content")
    documents = split_documents(tmp_path / "out" / "train.bin") + split_documents(tmp_path / "out" / "val.bin")
    assert sorted(documents) == sorted(r["content"] for r in rows) and meta["text_field"] == "content"
    with pytest.raises(UserError, match=r"d.jsonl:1: no field 'text' \(it has: id, content\)"):
        prepare_dataset(str(path), tmp_path / "other")


def test_failed_prepare_leaves_nothing_that_looks_complete(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"Doc {i}."}) for i in range(10)))
    prepare_dataset(str(path), tmp_path / "out", val_fraction=0.3)
    with open(path, "a") as f:
        f.write("\n{not json\n")
    with pytest.raises(UserError, match=r"d.jsonl:11: not valid JSON"):
        prepare_dataset(str(path), tmp_path / "out", val_fraction=0.3)
    assert not any(".tmp" in p.name for p in (tmp_path / "out").iterdir())
    with pytest.raises(UserError, match="no prepared data in"):
        read_meta(tmp_path / "out")


def test_prepare_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"Row {i} of the table." for i in range(12)] + [None]
    pq.write_table(pa.table({"text": texts, "n": list(range(13))}), tmp_path / "d.parquet")
    meta = prepare_dataset(str(tmp_path / "d.parquet"), tmp_path / "out", val_fraction=0.3)
    documents = split_documents(tmp_path / "out" / "train.bin") + split_documents(tmp_path / "out" / "val.bin")
    assert sorted(documents) == sorted(texts[:-1]) and meta["train_documents"] + meta["val_documents"] == 12


def test_hf_spec_reads_a_local_dataset_folder_and_fails_clearly_offline(tmp_path):
    folder = tmp_path / "hfdata"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps({"text": f"Example {i}."}) for i in range(8)))
    meta = prepare_dataset(f"hf:{folder}", tmp_path / "out", val_fraction=0.3)
    assert meta["source_kind"] == "hf" and meta["train_documents"] + meta["val_documents"] == 8
    with pytest.raises(UserError, match="cannot load Hugging Face dataset 'nobody/no-such-dataset'.*local"):
        prepare_dataset("hf:nobody/no-such-dataset", tmp_path / "out2")


def test_spec_matching_nothing_names_the_path(tmp_path):
    with pytest.raises(UserError, match="missing/\\*.txt"):
        prepare_dataset(str(tmp_path / "missing" / "*.txt"), tmp_path / "out")
    (tmp_path / "notes.md").write_text("hi")
    with pytest.raises(UserError, match="unsupported file type '.md'"):
        prepare_dataset(str(tmp_path / "notes.md"), tmp_path / "out")


def test_read_meta_missing_says_what_to_run(tmp_path):
    with pytest.raises(UserError, match=f"no prepared data in {tmp_path}: run python -m dist_gpt.prepare --dataset .* --out {tmp_path}"):
        read_meta(tmp_path)


def test_prepare_entry_point_reads_config_and_flags(tmp_path, capsys):
    from dist_gpt.tools.prepare import main

    write_txt(tmp_path / "txt")
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  dataset: {tmp_path / 'txt'}\n  dir: {tmp_path / 'from-config'}\n  val_fraction: 0.5\n")
    meta = main(["--config", str(config), "--val-fraction", "0.25"])
    assert meta["val_fraction"] == 0.25 and (tmp_path / "from-config" / "meta.json").is_file()
    with pytest.raises(SystemExit) as exit_info:
        main(["--dataset", str(tmp_path / "nothing.txt"), "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2 and "nothing.txt" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ loader


@pytest.fixture
def counting_bin(tmp_path) -> Path:
    """Token i has id i mod 50000: a window's content tells where it came from."""
    path = tmp_path / "train.bin"
    (np.arange(5000) % 50000).astype(np.uint16).tofile(path)
    return path


def batches(loader: TokenLoader, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next_batch() for _ in range(count)]


def test_loader_windows_and_targets(counting_bin):
    x, y = TokenLoader(counting_bin, block_size=16, micro_batch_size=4).next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert x.is_contiguous() and y.is_contiguous()
    assert torch.equal(y, x + 1)  # y is x shifted by one
    assert torch.equal(x - x[:, :1], torch.arange(16).expand(4, 16))  # each row is one contiguous window


def test_loader_is_deterministic_and_seeded(counting_bin):
    a, b = (batches(TokenLoader(counting_bin, 16, 4, seed=7), 3) for _ in range(2))
    assert all(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(a, b))
    other = batches(TokenLoader(counting_bin, 16, 4, seed=8), 3)
    assert not all(torch.equal(xa, xo) for (xa, _), (xo, _) in zip(a, other))


def test_ranks_read_disjoint_parts_of_one_global_stream(counting_bin):
    rank0, rank1 = (batches(TokenLoader(counting_bin, 16, 2, rank=r, world_size=2, seed=3), 3) for r in (0, 1))
    single = batches(TokenLoader(counting_bin, 16, 4, seed=3), 3)
    for (x0, _), (x1, _), (x, _) in zip(rank0, rank1, single):
        assert not torch.equal(x0, x1)
        assert torch.equal(torch.cat([x0, x1]), x)


def test_state_dict_resumes_the_identical_stream_even_on_another_world_size(counting_bin):
    two_ranks = [TokenLoader(counting_bin, 16, 2, rank=r, world_size=2, seed=5) for r in (0, 1)]
    for loader in two_ranks:
        batches(loader, 3)
    state = json.loads(json.dumps(two_ranks[0].state_dict()))  # survives a checkpoint's serialisation
    assert state == two_ranks[1].state_dict()
    continued = [torch.cat([loader.next_batch()[0] for loader in two_ranks]) for _ in range(2)]

    same_world = TokenLoader(counting_bin, 16, 2, rank=1, world_size=2, seed=999)
    same_world.load_state_dict(state)
    one_rank = TokenLoader(counting_bin, 16, 4, seed=999)  # the saved seed wins
    one_rank.load_state_dict(state)
    for expected in continued:
        assert torch.equal(same_world.next_batch()[0], expected[2:])
        assert torch.equal(one_rank.next_batch()[0], expected)


def test_loader_refuses_data_shorter_than_a_window(tmp_path):
    path = tmp_path / "val.bin"
    np.arange(8, dtype=np.uint16).tofile(path)
    with pytest.raises(UserError, match="data has 8 tokens, fewer than block_size\\+1 = 9; lower model.block_size"):
        TokenLoader(path, block_size=8, micro_batch_size=1)
    x, y = TokenLoader(path, block_size=7, micro_batch_size=3).next_batch()  # exactly one window fits
    assert torch.equal(x, torch.arange(7).expand(3, 7)) and torch.equal(y, x + 1)
    with pytest.raises(UserError, match="no prepared data"):
        TokenLoader(tmp_path / "missing.bin", 8, 1)
