"""Dataset specs -> documents (plain strings), streamed: nothing here holds a whole large dataset in memory.

A spec is one of
  bible-es           the Spanish Reina-Valera 1909 from Debian's sword-text-sparv; a document is a chapter
  PATH | DIR | GLOB  local files: .txt, .jsonl, .parquet (a DIR means every such file under it)
  hf:NAME[:CONFIG]   a Hugging Face dataset, streamed from the Hub (needs network, or a local dataset folder)

What a document is matters twice: an end-of-text token follows each one, and the train/val split is made by
whole documents (so val text never appears in train). Per format:
  .txt      a paragraph: text between blank lines. One file is often one book (or all of Shakespeare), so
            "a file is a document" would leave nothing to split; put one document per JSONL line to keep
            longer units whole.
  .jsonl    one JSON object per line; the document is its `text_field`
  .parquet  one row; the document is its `text_field` column
  hf:       one example; the document is its `text_field`
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dist_gpt.data import sword
from dist_gpt.errors import UserError

BIBLE_ES = "bible-es"
HF_PREFIX = "hf:"
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
HASH_CHUNK_BYTES = 1 << 24
SCRIPT_REFUSAL = "Dataset scripts are no longer supported"  # datasets >= 4's RuntimeError for a loading script
PARQUET_REVISION = "refs/convert/parquet"  # where the Hub keeps a dataset's automatic Parquet conversion


@dataclass
class Source:
    """A dataset, ready to be read. `documents()` may be called more than once and yields the same sequence."""

    spec: str
    kind: str  # bible-es | files | hf
    document_unit: str  # what one document is, for meta.json and the user
    documents: Callable[[], Iterator[str]]
    identity: Callable[[], str]  # sha256 that changes when the input does (file contents, or the dataset's name)
    files: list[Path] = field(default_factory=list)
    num_documents: int | None = None  # when known up front (progress bars)


def open_source(spec: str, text_field: str = "text", hf_split: str = "train") -> Source:
    spec = spec.strip()
    if spec == BIBLE_ES:
        return _bible_source()
    if spec.startswith(HF_PREFIX):
        return _hf_source(spec, text_field, hf_split)
    return _file_source(spec, text_field)


# ------------------------------------------------------------------------------------------ the Bible


def _bible_source() -> Source:
    files = sword.module_files(sword.BIBLE_ES_MODULE)  # UserError with the apt-get line if it is not installed
    chapters = sword.read_chapters(sword.BIBLE_ES_MODULE)  # ~4 MB: small enough to read at once
    return Source(
        spec=BIBLE_ES,
        kind="bible-es",
        document_unit="a chapter (verses joined with newlines)",
        documents=lambda: iter(chapters),
        identity=lambda: sha256_files(files),
        files=files,
        num_documents=len(chapters),
    )


# ------------------------------------------------------------------------------------------ local files


def find_files(spec: str) -> list[Path]:
    """The files a local spec names, sorted (the order fixes the token stream). UserError if there are none."""
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES)
        if not files:
            raise UserError(f"{spec} has no {'/'.join(FILE_SUFFIXES)} files: give a folder, file or glob that has some")
        return files
    if glob.has_magic(str(path)):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    else:
        files = [path] if path.is_file() else []
    if not files:
        raise UserError(f"dataset {spec!r} matches no files: give bible-es, hf:NAME, or an existing .txt/.jsonl/.parquet path or glob")
    for f in files:
        if f.suffix not in FILE_SUFFIXES:
            raise UserError(f"{f}: unsupported file type {f.suffix or '(none)'!r}: use {', '.join(FILE_SUFFIXES)}")
    return files


def _file_source(spec: str, text_field: str) -> Source:
    files = find_files(spec)
    readers = {".txt": _txt_paragraphs, ".jsonl": lambda f: _jsonl_texts(f, text_field), ".parquet": lambda f: _parquet_texts(f, text_field)}
    units = {".txt": "a paragraph of a .txt file", ".jsonl": f"a .jsonl line's {text_field!r}", ".parquet": f"a .parquet row's {text_field!r}"}

    def documents() -> Iterator[str]:
        for f in files:
            yield from readers[f.suffix](f)

    return Source(
        spec=spec,
        kind="files",
        document_unit="; ".join(units[s] for s in sorted({f.suffix for f in files})),
        documents=documents,
        identity=lambda: sha256_files(files),
        files=files,
    )


def _txt_paragraphs(path: Path) -> Iterator[str]:
    """Blank-line-separated paragraphs, line breaks inside kept. Streams: a file may be larger than memory."""
    paragraph: list[str] = []
    try:
        with open(path, encoding="utf-8") as lines:
            for line in lines:
                if line.strip():
                    paragraph.append(line)
                elif paragraph:
                    yield "".join(paragraph).rstrip("\n")
                    paragraph = []
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): convert it, e.g. iconv -t utf-8") from None
    if paragraph:
        yield "".join(paragraph).rstrip("\n")


def _jsonl_texts(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{number}: not valid JSON ({e.msg}): one JSON object per line") from None
            if not isinstance(record, dict) or text_field not in record:
                keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
                raise UserError(f"{path}:{number}: no field {text_field!r} (it has: {keys}): set data.text_field / --text-field")
            yield _checked_text(record[text_field], f"{path}:{number}", text_field)


def _parquet_texts(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq  # comes with `datasets`; imported here because only parquet needs it

    table = pq.ParquetFile(path)
    if text_field not in table.schema_arrow.names:
        raise UserError(f"{path}: no column {text_field!r} (it has: {', '.join(table.schema_arrow.names)}): set data.text_field / --text-field")
    for batch in table.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            yield _checked_text(text, str(path), text_field)


def _checked_text(value, where: str, text_field: str) -> str:
    if value is None:
        return ""  # a missing value is an empty document, which preparation skips
    if not isinstance(value, str):
        raise UserError(f"{where}: field {text_field!r} is {type(value).__name__}, not text: set data.text_field to a text column")
    return value


def sha256_files(files: list[Path]) -> str:
    """One hash over the files' names and contents (the names: renaming a file reorders the stream)."""
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0")
        with open(f, "rb") as content:
            while chunk := content.read(HASH_CHUNK_BYTES):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ Hugging Face


def _hf_source(spec: str, text_field: str, hf_split: str) -> Source:
    name, _, config_name = spec.removeprefix(HF_PREFIX).partition(":")
    if not name:
        raise UserError(f"dataset {spec!r} names no dataset: write hf:NAME, e.g. hf:Skylion007/openwebtext")
    identity = {"hf": name, "config": config_name or None, "split": hf_split}

    def documents() -> Iterator[str]:
        dataset = _load_hf(name, config_name or None, hf_split)
        for number, example in enumerate(_hf_examples(dataset, name, config_name or None, hf_split)):
            if number == 0 and text_field not in example:
                raise UserError(f"{spec}: no field {text_field!r} (it has: {', '.join(example)}): set data.text_field / --text-field")
            yield _checked_text(example[text_field], f"{spec} example {number}", text_field)

    return Source(
        spec=spec,
        kind="hf",
        document_unit=f"an example's {text_field!r}",
        documents=documents,
        # The Hub gives no cheap content hash of a streamed dataset, so the identity is its name, config and
        # split: a dataset changed upstream needs --force.
        identity=lambda: hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest(),
    )


def _load_hf(name: str, config_name: str | None, split: str):
    """Streaming: an OpenWebText-sized set is read and tokenized as it arrives, with no Arrow copy on disk.

    datasets >= 4 refuses a dataset that holds a loading script (Skylion007/openwebtext has one) with a
    RuntimeError; the Hub keeps a Parquet conversion of most datasets at the revision refs/convert/parquet,
    which needs no script: we read that instead, and say so. Any failure is one line, never a traceback."""
    import datasets  # ~1 s to import: only when a hf: spec is used

    try:
        return datasets.load_dataset(name, config_name, split=split, streaming=True)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds (RuntimeError, OSError, ValueError, its own)
        if SCRIPT_REFUSAL not in str(e):
            raise _hf_error(name, config_name, split, e) from None
    print(f"note: {name} is a dataset with a loading script, which datasets {datasets.__version__} no longer runs: reading its Parquet conversion (revision {PARQUET_REVISION}) instead", flush=True)
    try:
        return datasets.load_dataset(name, config_name, split=split, streaming=True, revision=PARQUET_REVISION)
    except Exception as e:  # noqa: BLE001
        raise _hf_error(name, config_name, split, e, f"nor its Parquet conversion ({PARQUET_REVISION})") from None


def _hf_examples(dataset, name: str, config_name: str | None, split: str) -> Iterator[dict]:
    """The examples of a streamed dataset; a failure while streaming (the network, a bad shard) is one line."""
    examples = iter(dataset)
    while True:
        try:
            example = next(examples)
        except StopIteration:
            return
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001
            raise _hf_error(name, config_name, split, e, "while streaming it") from None
        yield example


def _hf_error(name: str, config_name: str | None, split: str, error: Exception, what: str = "") -> UserError:
    reason = " ".join(f"{type(error).__name__}: {error}".split())[:300]
    return UserError(
        f"cannot load Hugging Face dataset {name!r} ({f'config {config_name!r}, ' if config_name else ''}split {split!r}){' ' + what if what else ''}: {reason}. It needs the Hub (network) or a local "
        "dataset folder; offline, give local .txt/.jsonl/.parquet files instead"
    )
