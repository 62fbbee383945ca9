"""Tokenize a dataset into train.bin / val.bin (GPT-2 ids as uint16) plus meta.json.

- Documents stream through in batches: worker processes tokenize and hash them (one batch each, see
  encode_pool) while this process reads the next ones, and the results are appended to the .bin files in
  reading order. Memory stays flat whatever the dataset's size; the files are the same at any process count.
- Every document is followed by the end-of-text token (50256), so the model sees where documents end.
- The split is by document and by content: a document goes to val when a hash of its text falls below
  val_fraction. The same text always lands in the same split, whatever the order or the machine, and a
  duplicated document cannot sit on both sides. If the hash leaves one side empty (a tiny dataset), the
  document closest to the threshold is moved over, so both splits always have text.
- Files are written under temporary names and renamed at the end, and meta.json (the mark of a finished
  prepare) is removed first and written last: an interrupted prepare never looks complete.
- meta.json records the inputs' sha256 and the settings; re-running on the same inputs and settings does
  nothing (force=True redoes it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dist_gpt.config import Config
from dist_gpt.data.encode_pool import TOKEN_DTYPE, EncodedBatch, encoded_batches, split_position  # noqa: F401 - split_position: the split rule, used by tests
from dist_gpt.data.sources import Source, open_source
from dist_gpt.errors import UserError, read_json_file
from dist_gpt.tokenizer import EOT_ID, gpt2_encoding

META_FILE = "meta.json"
SPLITS = ("train", "val")
FORMAT_VERSION = 1
BATCH_CHARS = 1 << 23  # ~8 MB of text per tokenizer call: enough work for every thread, little memory
BATCH_DOCUMENTS = 8192
COPY_CHUNK_TOKENS = 1 << 24


# What makes prepared data these data: the inputs' content, how they were split and tokenized, what came out.
IDENTITY_KEYS = ("input_sha256", "tokenizer", "val_fraction", "text_field", "hf_split", "train_tokens", "val_tokens")


def data_identity(meta: dict) -> dict:
    """The part of meta.json a checkpoint records (checkpoint/resume.py compares it on resume); not the folder,
    the time or the speed of the prepare: the same data moved or prepared again are the same data."""
    return {key: meta.get(key) for key in IDENTITY_KEYS}


def prepare_command(config: Config) -> str:
    """The command that prepares the data `config` trains on: `--config NAME` for a preset, with a flag for each
    data key the run changed (a YAML file's name is no preset: its data keys as flags)."""
    from dist_gpt.config import load_config, preset_names

    base = load_config(config.name).data if config.name in preset_names() else Config().data
    flags = {"--dataset": (config.data.dataset, base.dataset), "--val-fraction": (config.data.val_fraction, base.val_fraction),
             "--text-field": (config.data.text_field, base.text_field), "--hf-split": (config.data.hf_split, base.hf_split)}
    changed = [f"{flag} {shlex.quote(str(value))}" for flag, (value, preset) in flags.items() if value != preset]
    its_dir = Config(data=dataclasses.replace(config.data, dir=base.dir)).data_dir  # where that command would write
    out = [f"--out {shlex.quote(str(config.data_dir))}"] if its_dir != config.data_dir else []
    named = [f"--config {config.name}"] if config.name in preset_names() else []
    return " ".join(["python -m dist_gpt.prepare", *named, *changed, *out])


def bin_path(data_dir: str | Path, split: str) -> Path:
    return Path(data_dir) / f"{split}.bin"


def read_meta(data_dir: str | Path, prepare: str = "") -> dict:
    """meta.json of a finished prepare; UserError (with the command to run: `prepare`, see prepare_command) if there is none."""
    data_dir = Path(data_dir)
    path = data_dir / META_FILE
    meta = read_json_file(
        path,
        missing=f"no prepared data in {data_dir}: run {prepare or f'python -m dist_gpt.prepare --dataset SPEC --out {data_dir}'}",
        corrupt=f"{path} is not valid JSON: re-run python -m dist_gpt.prepare --out {data_dir} --force",
    )
    if meta.get("format") != FORMAT_VERSION:
        raise UserError(f"{path} has format {meta.get('format')}, this code reads {FORMAT_VERSION}: re-run python -m dist_gpt.prepare --out {data_dir} --force")
    return meta


def prepare_dataset(
    dataset: str,
    out_dir: str | Path,
    val_fraction: float = 0.01,
    text_field: str = "text",
    hf_split: str = "train",
    num_proc: int = 0,
    force: bool = False,
    max_tokens: int = 0,
) -> dict:
    """Tokenize `dataset` (a spec, see dist_gpt.data.sources) into out_dir. Returns the meta dict.

    max_tokens: stop after the document that brings train + val to this many tokens (0 = the whole dataset):
    a sample of a dataset too large to take whole (FineWeb-Edu), made of its first whole documents."""
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction={val_fraction} must be between 0 and 1 (e.g. 0.01)")
    if num_proc < 0:
        raise UserError(f"num_proc={num_proc} must be 0 (one per core) or more")
    if max_tokens < 0:
        raise UserError(f"max_tokens={max_tokens} must be 0 (the whole dataset) or more")
    start = time.perf_counter()  # the whole job counts: reading, hashing, loading the tokenizer, writing
    out_dir = Path(out_dir)
    source = open_source(dataset, text_field, hf_split)
    settings = {
        "format": FORMAT_VERSION,
        "tokenizer": "gpt2",
        "source": source.spec,
        "input_sha256": source.identity(),
        "val_fraction": val_fraction,
        "text_field": text_field,
        "hf_split": hf_split,
        **({"max_tokens": max_tokens} if max_tokens else {}),  # absent when unlimited: older meta.json stay up to date
    }
    if not force and _is_up_to_date(out_dir, settings):
        meta = read_meta(out_dir)
        print(f"{out_dir} is up to date for {dataset} ({meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens): nothing to do (--force redoes it)")
        return meta

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / META_FILE).unlink(missing_ok=True)  # from here on the folder must not look prepared
    processes = num_proc or available_cores()
    with SplitWriter(out_dir) as writer:
        _tokenize_into(writer, source, val_fraction, processes, max_tokens)
        writer.ensure_both_splits_have_text(dataset)
        writer.commit()
    seconds = time.perf_counter() - start

    total_tokens = sum(writer.tokens.values())
    meta = {
        **settings,
        "vocab_size": gpt2_encoding().n_vocab,
        "eot_id": EOT_ID,
        "dtype": np.dtype(TOKEN_DTYPE).name,
        "max_token_id": writer.max_token_id,
        "source_kind": source.kind,
        "document": source.document_unit,
        "split_rule": "val if blake2b-64(document UTF-8) / 2^64 < val_fraction; an empty side gets the document nearest the threshold",
        "input_files": len(source.files),
        **{f"{split}_tokens": writer.tokens[split] for split in SPLITS},
        **{f"{split}_documents": writer.documents[split] for split in SPLITS},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
        "tokens_per_s": round(total_tokens / seconds),
        "num_processes": processes,
    }
    _write_atomically(out_dir / META_FILE, json.dumps(meta, indent=2) + "\n")
    print(
        f"prepared {dataset} -> {out_dir}: train {meta['train_tokens']:,} tokens ({meta['train_documents']:,} documents), "
        f"val {meta['val_tokens']:,} tokens ({meta['val_documents']:,} documents) in {seconds:.1f} s = {meta['tokens_per_s']:,} tokens/s"
    )
    return meta


def available_cores() -> int:
    """The cores this process may use (a container or taskset may allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _is_up_to_date(out_dir: Path, settings: dict) -> bool:
    """Same inputs and settings, and bins of the recorded sizes (a bin replaced since is not trusted)."""
    try:
        meta = json.loads((out_dir / META_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if any(meta.get(key) != value for key, value in settings.items()):
        return False
    itemsize = np.dtype(TOKEN_DTYPE).itemsize
    return all(bin_path(out_dir, s).is_file() and bin_path(out_dir, s).stat().st_size == meta[f"{s}_tokens"] * itemsize for s in SPLITS)


def _tokenize_into(writer: SplitWriter, source: Source, val_fraction: float, processes: int, max_tokens: int = 0) -> None:
    """Read the documents here while `processes` workers tokenize them (encode_pool); stop at max_tokens."""
    progress = tqdm(total=source.num_documents, unit="doc", desc="tokenizing", disable=None, dynamic_ncols=True)
    with progress:
        for encoded in encoded_batches(_batches(source.documents()), processes):
            if not _write_batch(writer, encoded, val_fraction, progress, max_tokens):
                return  # leaving the generator stops the workers


def _batches(documents: Iterable[str]) -> Iterator[list[str]]:
    batch, chars = [], 0
    for text in documents:
        if not text.strip():
            continue  # an empty document would only add a lone end-of-text token
        batch.append(text)
        chars += len(text)
        if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCUMENTS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _write_batch(writer: SplitWriter, encoded: EncodedBatch, val_fraction: float, progress: tqdm, max_tokens: int = 0) -> bool:
    """Append a batch's documents to their splits. False once max_tokens is reached (the rest is dropped)."""
    if max_tokens:
        room = max_tokens - sum(writer.tokens.values())
        reached = np.flatnonzero(np.cumsum(encoded.lengths) >= room)
        if len(reached):
            encoded = encoded.first(int(reached[0]) + 1)  # whole documents, up to the one that reaches the limit
    is_val = encoded.positions < val_fraction
    in_val = np.repeat(is_val, encoded.lengths)  # per token: does its document go to val?
    for split, mine in (("train", ~is_val), ("val", is_val)):
        writer.note_documents(split, encoded.positions[mine], encoded.lengths[mine])
        writer.append(split, encoded.ids[in_val if split == "val" else ~in_val])
    progress.update(len(encoded.lengths))
    progress.set_postfix(tokens=f"{sum(writer.tokens.values()):,}", refresh=False)
    return not max_tokens or sum(writer.tokens.values()) < max_tokens


@dataclass
class _Edge:
    """The document of a split nearest the val_fraction threshold: the one to move if the other split is empty."""

    position: float
    start: int  # in tokens, in the split's file
    length: int


class SplitWriter:
    """Appends token arrays to <split>.bin under temporary names; `commit` renames them into place. Leaving the
    `with` block without a commit (an error, Ctrl-C) removes the temporary files."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.tmp_paths = {split: bin_path(out_dir, split).with_name(f"{split}.bin.tmp-{os.getpid()}") for split in SPLITS}
        self.files = {split: open(path, "wb") for split, path in self.tmp_paths.items()}
        self.tokens = dict.fromkeys(SPLITS, 0)
        self.documents = dict.fromkeys(SPLITS, 0)
        self.edges: dict[str, _Edge | None] = dict.fromkeys(SPLITS, None)
        self.max_token_id = -1  # recorded in meta.json: the trainer checks it against model.vocab_size

    def __enter__(self) -> SplitWriter:
        return self

    def __exit__(self, *exc) -> None:
        for f in self.files.values():
            f.close()
        for path in self.tmp_paths.values():
            path.unlink(missing_ok=True)  # after a commit they are already renamed

    def note_documents(self, split: str, positions: np.ndarray, lengths: np.ndarray) -> None:
        """Documents about to be appended to `split` (before `append`): counted, and its edge kept."""
        if not len(positions):
            return
        # train's edge is its lowest position (nearest val), val's edge its highest (nearest train); the first on a tie
        i = int(np.argmin(positions) if split == "train" else np.argmax(positions))
        edge, position = self.edges[split], float(positions[i])
        if edge is None or (position < edge.position if split == "train" else position > edge.position):
            start = self.tokens[split] + int(lengths[:i].sum())
            self.edges[split] = _Edge(position, start, int(lengths[i]))
        self.documents[split] += len(positions)

    def append(self, split: str, ids: np.ndarray) -> None:
        ids.tofile(self.files[split])
        self.tokens[split] += len(ids)
        if len(ids):
            self.max_token_id = max(self.max_token_id, int(ids.max()))

    def ensure_both_splits_have_text(self, dataset: str) -> None:
        total = sum(self.documents.values())
        if total < 2:
            raise UserError(
                f"{dataset} has {total} non-empty document{'s' * (total != 1)}: a train/val split needs at least 2 "
                "(in .txt files, documents are separated by blank lines)"
            )
        for empty, full in (("val", "train"), ("train", "val")):
            if self.documents[empty] == 0:
                self._move_document(self.edges[full], full, empty)

    def _move_document(self, edge: _Edge, source: str, target: str) -> None:
        """Cut one document out of `source`'s file (rewriting it) and append it to `target`'s. Only happens
        when `target` got no document at all, i.e. for small datasets."""
        self.files[source].close()
        old = np.memmap(self.tmp_paths[source], dtype=TOKEN_DTYPE, mode="r")
        self.append(target, np.array(old[edge.start : edge.start + edge.length]))
        rewritten = self.tmp_paths[source].with_name(self.tmp_paths[source].name + "-rewrite")
        with open(rewritten, "wb") as out:
            for begin, end in ((0, edge.start), (edge.start + edge.length, len(old))):
                for chunk in range(begin, end, COPY_CHUNK_TOKENS):
                    np.asarray(old[chunk : min(chunk + COPY_CHUNK_TOKENS, end)]).tofile(out)
        del old
        os.replace(rewritten, self.tmp_paths[source])
        self.files[source] = open(self.tmp_paths[source], "ab")
        self.tokens[source] -= edge.length
        self.documents[source] -= 1
        self.documents[target] += 1

    def commit(self) -> None:
        for split in SPLITS:
            self.files[split].flush()
            os.fsync(self.files[split].fileno())
            self.files[split].close()
            os.replace(self.tmp_paths[split], bin_path(self.out_dir, split))


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
