"""Sharded, resumable checkpoints that survive the end of a rented GPU.

Layout of a run:

    out/<run>/checkpoints/
        step_000500/            one checkpoint: the strategy's files (its shards), per-rank
            manifest.json       RNG files, and the manifest (written last; a directory without one is incomplete)
        step_001000/
        latest                  the name of the newest complete checkpoint (replaced atomically, last)

A save writes into `step_N.tmp/`, then every rank checksums its own files, rank 0 writes the manifest,
renames the directory to `step_N/` (atomic on one filesystem) and only then points `latest` at it. A crash at
any moment leaves `latest` on a complete checkpoint; a stale `.tmp` directory is removed by the next save.
Older checkpoints beyond keep_last_k are deleted only after the new one is published.

The model and optimizer files are the strategy's business (parallel/: what it writes, which rank wrote which
file, how to consolidate them); this module only publishes, verifies and finds them. Loading here never
unpickles: RNG states come through `torch.load(weights_only=True)`, everything else (step, data position,
config) from JSON. The strategies' own files hold tensors only (DCP), except for a strategy whose library
writes pickles (its module says so): resume or consolidate only such checkpoints you trust.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import CheckpointException

from dist_gpt.checkpoint.manifest import FORMAT, LATEST, MANIFEST, check_model_shape, file_crc32, read_manifest, resolve_checkpoint_dir, step_dir_name, verify_files
from dist_gpt.config import Config
from dist_gpt.errors import UserError
from dist_gpt.parallel import checkpoint_file_rank
from dist_gpt.runtime.distributed import DistEnv, all_reduce_max
from dist_gpt.runtime.safe_write import attempt_write, describe_write_error, write_atomically
from dist_gpt.runtime.stop_signals import StopRequest, catch_stop_signals

# DCP warns on every single-process save/load that it assumes a single process, which is what we mean.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")
RNG_FILE = re.compile(r"rng_rank(\d+)\.pt$")  # one per rank, ours; the strategy's files are named by it


# ------------------------------------------------------------------------------------------ RNG


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ------------------------------------------------------------------------------------------ the checkpointer


class Checkpointer:
    """Saves and resumes the stateful parts of a run: the strategy's model + optimizer, and `parts`
    (objects with state_dict()/load_state_dict() returning JSON-able dicts: the data loader, the loop's state)."""

    def __init__(self, config: Config, env: DistEnv, strategy, parts: dict):
        self.config, self.env, self.strategy, self.parts = config, env, strategy, parts
        self.root = config.run_dir / "checkpoints"
        self.last_save_time = time.monotonic()
        self.pending: PendingSave | None = None  # an async save in flight
        self.failure: str | None = None  # why the newest save was not published (None: it was, or none was tried)
        self.longest_save_seconds: float | None = None  # from the start of a save to its publication, in this process
        self.last_saved_step: int | None = None  # by this process
        self.rng_restored = False  # set by load(): this rank's RNG continues the saved stream
        self.stop = StopRequest()

    # ---------------------------------------------------------------- resume

    def resume(self) -> str | None:
        """Load the checkpoint that checkpoint.resume names (auto: this run's latest, if any). Returns its path."""
        mode = self.config.checkpoint.resume
        has_latest = (self.root / LATEST).is_file()
        if mode == "never":
            if has_latest:
                raise UserError(
                    f"{self.config.run_dir} already has checkpoints and checkpoint.resume=never would overwrite them: "
                    f"choose a new train.run_name, or resume with checkpoint.resume=auto"
                )
            return None
        if mode == "auto":
            if not has_latest:
                return None
            ckpt_dir = resolve_checkpoint_dir(self.root)
        else:
            ckpt_dir = resolve_checkpoint_dir(mode)
        self.load(ckpt_dir)
        return str(ckpt_dir)

    def load(self, ckpt_dir: Path) -> None:
        manifest = read_manifest(ckpt_dir)
        check_model_shape(ckpt_dir, manifest, self.config)
        if self.env.is_main:
            verify_files(ckpt_dir, manifest)
        self._barrier()
        self.strategy.load_checkpoint(ckpt_dir, manifest)
        for name, part in self.parts.items():
            if name in manifest["parts"]:  # a part newer than the checkpoint (the fp16 loss scaler) starts fresh
                part.load_state_dict(manifest["parts"][name])
        rng_file = ckpt_dir / f"rng_rank{self.env.rank}.pt"
        if rng_file.is_file():  # absent when this run has more ranks than the one that saved: those reseed
            set_rng_state(torch.load(rng_file, weights_only=True), self.env.device)
            self.rng_restored = True

    # ---------------------------------------------------------------- save

    def due(self, step: int) -> bool:
        c = self.config.checkpoint
        by_steps = bool(c.every_steps) and step % c.every_steps == 0
        by_clock = bool(c.every_minutes) and time.monotonic() - self.last_save_time >= 60 * c.every_minutes
        return by_steps or self._agree(by_clock)

    def save(self, step: int) -> None:
        """Save the current state as step `step`. With checkpoint.async_save the files are written in the
        background and published at the next save, poll or finish.

        Weights that are not finite are never written. A write that fails (a full disk: any OSError, on any
        rank) is abandoned by every rank alike: its step_N.tmp is removed, the previous checkpoint and `latest`
        stay as they were, one line says so and the run goes on; `failure` keeps the reason until a save succeeds."""
        self.wait()  # one save in flight at most; also publishes the previous one
        if step == self.last_saved_step:
            return  # already saved at this step (e.g. the end of the run after a periodic save)
        save = PendingSave(step, self.root / (step_dir_name(step) + ".tmp"), self.root / step_dir_name(step), time.monotonic())
        if self._agree(not self.strategy.local_weights_finite()):
            return self._abandon(save, "its weights are not finite (the run diverged)")
        self.last_saved_step = step
        if self.env.is_main:
            save.error = attempt_write(self._make_tmp_dir, save.tmp_dir)[1]
        self._barrier()
        save.error = save.error or attempt_write(torch.save, rng_state(self.env.device), save.tmp_dir / f"rng_rank{self.env.rank}.pt")[1]
        save.parts = {name: part.state_dict() for name, part in self.parts.items()}
        try:  # every rank enters, whatever failed above: DCP's collectives inside must match
            future = self.strategy.save_checkpoint(save.tmp_dir, async_save=self.config.checkpoint.async_save)
        except (OSError, RuntimeError, CheckpointException) as e:  # DCP agrees on it: every rank raises
            save.error, future = save.error or describe_write_error(e), None
        self.last_save_time = time.monotonic()
        if future is None:
            mine, error = attempt_write(self._my_checksums, save.tmp_dir) if not save.error else (None, None)
            save.error = save.error or error
            self._publish(save, mine)
        else:
            save.checksums = self._then_checksum(future, save.tmp_dir)
            self.pending = save

    def _make_tmp_dir(self, tmp_dir: Path) -> None:
        for stale in self.root.glob("step_*.tmp"):
            shutil.rmtree(stale)  # left by a crash mid-save (any step): never published, safe to remove
        tmp_dir.mkdir(parents=True)

    def _then_checksum(self, written: Future, tmp_dir: Path) -> Future:
        """A future of this rank's checksums, computed by the writer thread once its files are written: the
        loop's poll() then publishes without reading the files back itself (~1 s per GB)."""
        checked: Future = Future()

        def checksum(done: Future) -> None:
            try:
                done.result()
                checked.set_result(self._my_checksums(tmp_dir))
            except BaseException as e:  # noqa: BLE001 - re-raised by wait()
                checked.set_exception(e)

        written.add_done_callback(checksum)
        return checked

    def poll(self) -> None:
        """Publish an async save whose files are written (called once per step; cheap)."""
        if self.pending is not None and self._agree(self.pending.checksums.done()):
            self.wait()

    def wait(self) -> None:
        if self.pending is None:
            return
        save, self.pending = self.pending, None
        try:
            mine = save.checksums.result()
        except (OSError, RuntimeError, CheckpointException) as e:
            save.error, mine = save.error or describe_write_error(e), None
        self._publish(save, mine)

    def finish(self) -> None:
        self.wait()

    def _my_checksums(self, tmp_dir: Path) -> dict:
        """[size, CRC32] of each file this rank wrote."""
        return {p.name: [p.stat().st_size, file_crc32(p)] for p in sorted(tmp_dir.iterdir()) if self._written_by_me(p.name)}

    def _publish(self, save: PendingSave, mine: dict | None) -> None:
        """Every rank brings its checksums (or why it could not write); rank 0 writes the manifest, renames
        step_N.tmp to step_N and points `latest` at it, or every rank abandons the save."""
        gathered = self._gather((save.error, mine))  # one collective: every rank's outcome
        errors = [error for error, _ in gathered if error]
        if errors:
            return self._abandon(save, errors[0])
        error = attempt_write(self._publish_on_main, save, {k: v for _, files in gathered for k, v in files.items()})[1] if self.env.is_main else None
        errors = [e for e in self._gather(error) if e]  # also the barrier: no rank runs ahead of the rename
        if errors:
            return self._abandon(save, errors[0])
        self.failure = None
        self.longest_save_seconds = max(self.longest_save_seconds or 0.0, time.monotonic() - save.started)

    def _publish_on_main(self, save: PendingSave, files: dict) -> None:
        manifest = {
            "format": FORMAT,
            "step": save.step,
            "strategy": self.strategy.name,
            "world_size": self.env.world_size,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "parts": save.parts,
            "config": self.config.to_dict(),
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
            write_atomically(self.root / LATEST, final_dir.name)
        except OSError:
            os.replace(final_dir, save.tmp_dir)  # unpublished again: _abandon removes it
            if replaced.exists():
                os.replace(replaced, final_dir)
            raise
        shutil.rmtree(replaced, ignore_errors=True)
        self._delete_old(keep=final_dir.name)
        print(f"checkpoint saved: {final_dir}", flush=True)

    def _abandon(self, save: PendingSave, reason: str) -> None:
        if self.last_saved_step == save.step:
            self.last_saved_step = None  # a later call at this step must try again
        self.failure = f"the checkpoint of step {save.step} was not saved: {reason}"
        if self.env.is_main:
            shutil.rmtree(save.tmp_dir, ignore_errors=True)  # every rank is past its writes (DCP or _gather agreed)
            latest = self.latest()
            kept = f"{latest} is still the latest" if latest else "there is no earlier checkpoint"
            free = shutil.disk_usage(self.root).free / 2**20 if self.root.is_dir() else 0
            print(f"warning: {self.failure}; {kept} ({free:,.0f} MB free there); the run goes on and its next save tries again", flush=True)
        self._barrier()

    def _written_by_me(self, name: str) -> bool:
        """Who checksums which file: the rank that wrote it (on multi-node, a rank may not see another node's
        files until they are flushed): rank r its RNG file and the files the strategy names as rank r's;
        rank 0 everything else."""
        rng = RNG_FILE.match(name)
        writer = int(rng[1]) if rng else checkpoint_file_rank(name)
        return self.env.is_main if writer is None else writer == self.env.rank

    def _delete_old(self, keep: str) -> None:
        complete = sorted((p for p in self.root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))
        for old in complete[: -self.config.checkpoint.keep_last_k]:
            if old.name != keep:
                # Out of the step_N namespace first (one atomic rename), then deleted: a kill in the middle of the
                # delete leaves a step_N.old.tmp, which the next save removes, never a step_N that has its
                # manifest but lacks some of its shards.
                doomed = old.with_name(old.name + ".old.tmp")
                shutil.rmtree(doomed, ignore_errors=True)
                os.replace(old, doomed)
                shutil.rmtree(doomed, ignore_errors=True)

    def latest(self) -> str | None:
        """The newest published checkpoint's directory, if any."""
        pointer = self.root / LATEST
        return str(self.root / pointer.read_text().strip()) if pointer.is_file() else None

    # ---------------------------------------------------------------- signals

    @contextlib.contextmanager
    def stop_signals(self):
        with catch_stop_signals(self.stop):
            yield self

    def should_stop(self) -> str | None:
        """The signal that asked us to stop, agreed over ranks (a scheduler may signal only some of them)."""
        local = self.stop.requested
        if self._agree(local is not None):
            return local or "a signal on another rank"
        return None

    # ---------------------------------------------------------------- collectives

    def _agree(self, flag: bool) -> bool:
        """True on every rank if it is true on any (so every rank takes the same branch)."""
        return bool(all_reduce_max([float(flag)])[0])

    def _gather(self, mine) -> list:
        """Every rank's `mine` (any picklable value), in rank order."""
        if not self.env.distributed:
            return [mine]
        gathered = [None] * self.env.world_size
        dist.all_gather_object(gathered, mine)
        return gathered

    def _barrier(self) -> None:
        if self.env.distributed:
            dist.barrier()



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
