"""Writing one checkpoint and publishing it atomically, on every rank alike.

A save writes into `step_N.tmp/`: the strategy's shards (each rank its own), each rank's RNG file. Then every
rank checksums the files it wrote, rank 0 writes the manifest (last: a directory without one is incomplete),
renames the directory to `step_N/` (atomic on one filesystem) and only then points `latest` at it. A crash at
any moment leaves `latest` on a complete checkpoint; a stale `.tmp` directory is removed by the next save. A
write that fails on any rank (a full disk) is abandoned by every rank: the `.tmp` goes, `latest` stays.

The model and optimizer files are the strategy's business (parallel/: what it writes, which rank wrote which
file); this module only publishes them. Loading never unpickles: RNG states come through
`torch.load(weights_only=True)`, everything else (step, data position, config) from JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.distributed.checkpoint import CheckpointException

from dist_gpt.checkpoint.manifest import FORMAT, LATEST, MANIFEST, file_crc32, step_dir_name
from dist_gpt.checkpoint.rng import RNG_FILE, rng_file_name, rng_state
from dist_gpt.config import Config
from dist_gpt.parallel import checkpoint_file_rank
from dist_gpt.runtime.distributed import DistEnv, broadcast_from_main, gather_objects
from dist_gpt.runtime.safe_write import attempt_write, describe_write_error, write_atomically

WRITE_ERRORS = (OSError, RuntimeError, CheckpointException)  # how a failed write surfaces (safe_write names it)


@dataclass
class PendingSave:
    """One save on its way from step_N.tmp to step_N."""

    step: int
    tmp_dir: Path
    final_dir: Path
    started: float  # time.monotonic()
    parts: dict = field(default_factory=dict)
    error: str | None = None  # why this rank could not write its part
    checksums: Future | None = None  # async: this rank's checksums, once its files are written


def write_checkpoint(root: Path, step: int, env: DistEnv, strategy, parts: dict, async_save: bool) -> PendingSave:
    """Write step `step` into root/step_N.tmp on every rank. Synchronous: returns with `checksums` done;
    async: the strategy's files are written in the background and `checksums` completes after them."""
    save = PendingSave(step, root / (step_dir_name(step) + ".tmp"), root / step_dir_name(step), time.monotonic())
    if env.is_main:
        save.error = attempt_write(_make_tmp_dir, root, save.tmp_dir)[1]
    # Every rank learns of rank 0's failure before it writes into the directory rank 0 did not make (a read-only
    # or full disk): no rank then writes, and all abandon the save alike.
    save.error = broadcast_from_main(save.error)
    if save.error:
        save.checksums = Future()
        save.checksums.set_result(None)
        return save
    save.error = attempt_write(torch.save, rng_state(env.device), save.tmp_dir / rng_file_name(env.rank))[1]
    save.parts = {name: part.state_dict() for name, part in parts.items()}
    try:  # every rank enters, whatever failed above: DCP's collectives inside must match
        written = strategy.save_checkpoint(save.tmp_dir, async_save=async_save)
    except WRITE_ERRORS as e:  # DCP agrees on it: every rank raises
        save.error, written = save.error or describe_write_error(e), None
    if written is None:
        save.checksums = Future()
        mine, error = attempt_write(my_checksums, save.tmp_dir, env.rank) if not save.error else (None, None)
        save.error = save.error or error
        save.checksums.set_result(mine)
    else:
        save.checksums = _then_checksum(written, save.tmp_dir, env.rank)
    return save


def _make_tmp_dir(root: Path, tmp_dir: Path) -> None:
    for stale in root.glob("step_*.tmp"):
        shutil.rmtree(stale)  # left by a crash mid-save (any step): never published, safe to remove
    tmp_dir.mkdir(parents=True)


def _then_checksum(written: Future, tmp_dir: Path, rank: int) -> Future:
    """A future of this rank's checksums, computed by the writer thread once its files are written: the loop
    then publishes without reading the files back itself (~1 s per GB)."""
    checked: Future = Future()

    def checksum(done: Future) -> None:
        try:
            done.result()
            checked.set_result(my_checksums(tmp_dir, rank))
        except BaseException as e:  # noqa: BLE001 - re-raised by publish()
            checked.set_exception(e)

    written.add_done_callback(checksum)
    return checked


def my_checksums(tmp_dir: Path, rank: int) -> dict:
    """[size, CRC32] of each file rank `rank` wrote."""
    return {p.name: [p.stat().st_size, file_crc32(p)] for p in sorted(tmp_dir.iterdir()) if written_by(p.name) == rank}


def written_by(name: str) -> int:
    """Which rank wrote (and so checksums) checkpoint file `name`: on multi-node, a rank may not see another
    node's files until they are flushed. Rank r its RNG file and the files the strategy names as rank r's;
    rank 0 everything else."""
    rng = RNG_FILE.match(name)
    writer = int(rng[1]) if rng else checkpoint_file_rank(name)
    return 0 if writer is None else writer


def publish(save: PendingSave, config: Config, env: DistEnv, strategy_name: str) -> str | None:
    """Every rank brings its checksums (or why it could not write); rank 0 writes the manifest, renames
    step_N.tmp to step_N and points `latest` at it. Returns None when published, else the reason (the same on
    every rank), the .tmp already removed."""
    try:
        mine = save.checksums.result()
    except WRITE_ERRORS as e:
        save.error, mine = save.error or describe_write_error(e), None
    gathered = gather_objects((save.error, mine))  # one collective: every rank's outcome
    errors = [error for error, _ in gathered if error]
    if not errors and env.is_main:
        files = {name: entry for _, written in gathered for name, entry in written.items()}
        errors = [attempt_write(_publish_on_main, save, files, config, env, strategy_name)[1]]
    errors = [e for e in gather_objects(errors[0] if errors else None) if e]  # also the barrier: no rank runs ahead of the rename
    if errors and env.is_main:
        shutil.rmtree(save.tmp_dir, ignore_errors=True)  # every rank is past its writes (DCP or the gather agreed)
    return errors[0] if errors else None


def _publish_on_main(save: PendingSave, files: dict, config: Config, env: DistEnv, strategy_name: str) -> None:
    manifest = {
        "format": FORMAT,
        "step": save.step,
        "strategy": strategy_name,
        "world_size": env.world_size,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "parts": save.parts,
        "config": config.to_dict(),
        "files": files,
    }
    write_atomically(save.tmp_dir / MANIFEST, json.dumps(manifest, indent=1))
    final_dir = save.final_dir
    replaced = final_dir.with_name(final_dir.name + ".old.tmp")
    if final_dir.exists():
        # An earlier process's (killed between its rename and `latest`, or a later step of a run resumed
        # from an older checkpoint): this state replaces it. Skipping the save would leave `latest` behind.
        os.replace(final_dir, replaced)
    os.replace(save.tmp_dir, final_dir)
    try:
        write_atomically(final_dir.parent / LATEST, final_dir.name)
    except OSError:
        os.replace(final_dir, save.tmp_dir)  # unpublished again: the caller removes it
        if replaced.exists():
            os.replace(replaced, final_dir)
        raise
    shutil.rmtree(replaced, ignore_errors=True)
