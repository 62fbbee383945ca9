"""A published checkpoint on disk: its name, its manifest, and the checks that it is whole and of this model.

    out/<run>/checkpoints/
        step_000500/            one checkpoint: the strategy's files (its shards), per-rank
            manifest.json       RNG files, and the manifest (written last; a directory without one is incomplete)
        step_001000/
        latest                  the name of the newest complete checkpoint (replaced atomically, last)

Loading here never unpickles: everything but tensors (step, data position, config) is JSON.
"""

from __future__ import annotations

import zlib
from pathlib import Path

from dist_gpt.config import Config
from dist_gpt.errors import UserError, read_json_file
from dist_gpt.model import SHAPE_FIELDS

FORMAT = "dist_gpt-checkpoint/1"
MANIFEST = "manifest.json"
LATEST = "latest"


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A run dir, its checkpoints/ dir (-> the latest), or one step_N dir, to a complete checkpoint dir."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (candidate / MANIFEST).is_file():
            return candidate
        if (candidate / LATEST).is_file():
            return candidate / (candidate / LATEST).read_text().strip()
    if path.is_dir() and path.name.startswith("step_"):
        raise UserError(f"checkpoint {path} has no {MANIFEST}: it was never completed; resume from another step_* directory")
    raise UserError(f"no checkpoint at {path}: give a run directory, its checkpoints/ directory, or a step_* directory")


def read_manifest(ckpt_dir: Path) -> dict:
    if not ckpt_dir.is_dir():
        raise UserError(f"checkpoint {ckpt_dir} does not exist (renamed or deleted?); resume from another step_* directory")
    manifest = read_json_file(
        ckpt_dir / MANIFEST,
        missing=f"checkpoint {ckpt_dir} has no {MANIFEST}: it was never completed; resume from another step_* directory",
        corrupt=f"checkpoint {ckpt_dir}: {MANIFEST} is corrupt; resume from another step_* directory",
    )
    if manifest.get("format") != FORMAT:
        raise UserError(f"checkpoint {ckpt_dir} is not a dist_gpt checkpoint ({MANIFEST} format {manifest.get('format')!r}, expected {FORMAT!r})")
    return manifest


def verify_files(ckpt_dir: Path, manifest: dict) -> None:
    """Every file the manifest lists is there with its size and CRC32: catches truncated or corrupt shards."""
    for name, (size, crc) in manifest["files"].items():
        path = ckpt_dir / name
        if not path.is_file():
            raise UserError(f"checkpoint {ckpt_dir} is missing {name}; resume from another step_* directory")
        if path.stat().st_size != size:
            raise UserError(f"checkpoint {ckpt_dir}: {name} is {path.stat().st_size} bytes, expected {size} (truncated?); resume from another step_* directory")
        if file_crc32(path) != crc:
            raise UserError(f"checkpoint {ckpt_dir}: {name} fails its checksum (corrupt); resume from another step_* directory")


def file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def check_model_shape(ckpt_dir: Path, manifest: dict, config: Config) -> None:
    """The checkpoint's model must agree with the run's on the shape fields (others, e.g. dropout, may change)."""
    saved = {"tie_embeddings": True, **manifest["config"]["model"]}  # checkpoints from before the key were tied
    fields = SHAPE_FIELDS + (("block_size",) if config.model.position == "learned" else ())  # the wpe table's rows
    diffs = [f"{k}={saved.get(k)!r} (this run: {getattr(config.model, k)!r})" for k in fields if saved.get(k) != getattr(config.model, k)]
    if diffs:
        raise UserError(f"checkpoint {ckpt_dir} is of another model: {', '.join(diffs)}; use a matching config, or a new train.run_name / checkpoint.resume=never")
