"""The Checkpointer the training loop drives: when to save, saving (checkpoint/publish.py), resuming
(checkpoint/resume.py), pruning (checkpoint/retention.py), and the stop signals that ask for a last save.

Layout of a run:

    out/<run>/checkpoints/
        step_000500/            one checkpoint: the strategy's files (its shards), per-rank
            manifest.json       RNG files, and the manifest (written last; a directory without one is incomplete)
        step_001000/
        latest                  the name of the newest complete checkpoint (replaced atomically, last)

Every decision that ranks must take alike (stop? save now? publish the async save?) is agreed in one
collective per step (`agree_on_step`), so every rank takes the same branch.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from dist_gpt.checkpoint import retention
from dist_gpt.checkpoint.publish import PendingSave, publish, write_checkpoint
from dist_gpt.checkpoint.remote_copy import RemoteCopy
from dist_gpt.checkpoint.resume import Lineage, checkpoint_to_resume, load_checkpoint
from dist_gpt.checkpoint.storage import LocalStorage
from dist_gpt.config import Config
from dist_gpt.errors import Interrupted
from dist_gpt.runtime.distributed import DistEnv, any_rank
from dist_gpt.runtime.stop_signals import StopRequest, catch_stop_signals


@dataclass
class StepDecision:
    """What every rank agreed at the end of a step."""

    stop_reason: str | None  # a stop was asked for (a signal on some rank, the time budget): save and stop
    save_due: bool  # checkpoint.every_steps / every_minutes says save now


class Checkpointer:
    """Saves and resumes the stateful parts of a run: the strategy's model + optimizer, and `parts` (objects with
    state_dict()/load_state_dict() returning JSON-able dicts: the data loader, the loop's state)."""

    def __init__(self, config: Config, env: DistEnv, strategy, parts: dict):
        self.lineage = Lineage()
        parts = {**parts, "lineage": self.lineage}  # each checkpoint also records where the run started
        self.config, self.env, self.strategy, self.parts = config, env, strategy, parts
        self.root = config.run_dir / "checkpoints"
        self.storage = LocalStorage(self.root)
        self.last_save_time = time.monotonic()
        self.pending: PendingSave | None = None  # an async save in flight
        self.failure: str | None = None  # why the newest save was not published (None: it was, or none was tried)
        self.longest_save_seconds: float | None = None  # from the start of a save to its publication, in this process
        self.last_saved_step: int | None = None  # by this process
        self.rng_restored = False  # set by load(): this rank's RNG continues the saved stream
        self.stop = StopRequest()
        self.remote: RemoteCopy | None = None  # checkpoint.remote: opened (and checked) by resume(), before step 1
        self.upload_failure: str | None = None  # set by finish(): why the last checkpoint is not in the remote store

    def resume(self) -> str | None:
        """Load the checkpoint that checkpoint.resume names (auto: this run's latest, if any; with a remote copy
        newer than the local one, that, downloaded first). Returns its path."""
        if self.config.checkpoint.remote:
            self.remote = RemoteCopy(self.config, self.env, self.root)
            self.remote.before_resume(self.config.checkpoint.resume)
        ckpt_dir, why = checkpoint_to_resume(self.config, self.storage)
        if ckpt_dir is None:
            return None
        self.load(ckpt_dir)
        if why == "path":  # after load(), which brought the checkpoint's own lineage
            self.lineage.started_from = str(Path(self.config.checkpoint.resume).resolve())  # the setting, as a requeue repeats it
        if self.env.is_main and why in ("path", "applied"):
            print(f"checkpoint.resume={self.config.checkpoint.resume}: "
                  + ("this run starts from it once; its restarts resume the run's own latest checkpoint" if why == "path"
                     else f"this run started from it; resuming the run's own latest, {ckpt_dir}"), flush=True)
        return str(ckpt_dir)

    def load(self, ckpt_dir) -> None:
        self.rng_restored = load_checkpoint(ckpt_dir, self.config, self.env, self.strategy, self.parts)

    def agree_on_step(self, step: int) -> StepDecision:
        """Once per step, one collective: a stop asked for on any rank, a periodic save due (by steps, or by the
        clock of any rank), and an async save whose files are written on every rank (then it is published)."""
        c = self.config.checkpoint
        by_steps = bool(c.every_steps) and step % c.every_steps == 0
        by_clock = bool(c.every_minutes) and time.monotonic() - self.last_save_time >= 60 * c.every_minutes
        still_writing = self.pending is not None and not self.pending.checksums.done()
        stop, clock, someone_writing = any_rank(self.stop.requested is not None, by_clock, still_writing)
        if self.pending is not None and not someone_writing:
            self.wait()  # every rank's files are written: publishing blocks no one
        return StepDecision((self.stop.requested or "a signal on another rank") if stop else None, by_steps or clock)

    def save(self, step: int) -> None:
        """Save the current state as step `step`. With checkpoint.async_save the files are written in the
        background and published at a later step, or by wait/finish.

        Weights that are not finite are never written. A write that fails (a full disk: any OSError, on any
        rank) is abandoned by every rank alike: its step_N.tmp is removed, the previous checkpoint and `latest`
        stay as they were, one line says so and the run goes on; `failure` keeps the reason until a save succeeds."""
        self.wait()  # one save in flight at most; also publishes the previous one
        if step == self.last_saved_step:
            return  # already saved at this step (e.g. the end of the run after a periodic save)
        if any_rank(not self.strategy.local_weights_finite())[0]:
            return self._abandoned(step, "its weights are not finite (the run diverged)")
        self.last_saved_step = step
        self.pending = write_checkpoint(self.root, step, self.env, self.strategy, self.parts, self.config.checkpoint.async_save)
        self.last_save_time = time.monotonic()
        if not self.config.checkpoint.async_save:
            self.wait()

    def wait(self) -> None:
        """Publish the save in flight, if any (blocks until its files are written)."""
        if self.pending is None:
            return
        save, self.pending = self.pending, None
        error = publish(save, self.config, self.env, self.strategy.name)
        if error:
            return self._abandoned(save.step, error)
        self.failure = None
        self.longest_save_seconds = max(self.longest_save_seconds or 0.0, time.monotonic() - save.started)
        if self.env.is_main:
            uploading = self.remote.in_flight() if self.remote else ()  # its upload reads it
            retention.prune(self.storage, self.config.checkpoint.keep_last_k, keep=(save.final_dir.name, *uploading))
            print(f"checkpoint saved: {save.final_dir}", flush=True)
        if self.remote:  # this rank's files of it go up in the background
            self.remote.submit(save.final_dir.name, save.checksums.result())

    def seconds_to_save(self) -> float | None:
        """What a stop must leave time for: the longest save so far, and with a remote copy its longest upload
        (the stop waits for the last one). None before the first save."""
        if self.longest_save_seconds is None:
            return None
        return self.longest_save_seconds + (self.remote.uploader.longest_seconds if self.remote else 0.0)

    def finish(self, upload_wait_seconds: float = 0.0) -> None:
        """Publish a save in flight; with a remote copy, wait (at most upload_wait_seconds) for its upload."""
        self.wait()
        if self.remote:
            self.upload_failure = self.remote.finish(upload_wait_seconds)

    def _abandoned(self, step: int, reason: str) -> None:
        if self.last_saved_step == step:
            self.last_saved_step = None  # a later call at this step must try again
        self.failure = f"the checkpoint of step {step} was not saved: {reason}"
        if self.env.is_main:
            latest = self.latest()
            kept = f"{latest} is still the latest" if latest else "there is no earlier checkpoint"
            free = shutil.disk_usage(self.root).free / 2**20 if self.root.is_dir() else 0
            print(f"warning: {self.failure}; {kept} ({free:,.0f} MB free there); the run goes on and its next save tries again", flush=True)

    def latest(self) -> str | None:
        """The newest published checkpoint's directory, if any."""
        name = self.storage.latest()
        return self.storage.location(name) if name else None

    @contextlib.contextmanager
    def stop_signals(self):
        """While inside, a stop signal asks for a last save (the loop's); a second Ctrl-C interrupts at once and
        becomes errors.Interrupted, whose one line names what is kept (no traceback; exit 130)."""
        try:
            with catch_stop_signals(self.stop):
                yield self
        except KeyboardInterrupt:
            raise Interrupted(self._interrupted()) from None

    def _interrupted(self) -> str:
        """After a second Ctrl-C: remove this rank's part of an unpublished save (no collective: the other ranks
        are stopping too, wherever they were) and say which checkpoint the same command resumes from."""
        unfinished = [p for p in self.root.glob("step_*.tmp")] if self.env.is_main else []
        for tmp in unfinished:
            shutil.rmtree(tmp, ignore_errors=True)  # never published; a save still writing into it fails with it
        latest = self.latest()
        dropped = f" (its unfinished {', '.join(p.name for p in unfinished)} removed)" if unfinished else ""
        kept = f"the newest checkpoint is {latest}: the same command resumes from it" if latest else "no checkpoint was saved"
        return f"interrupted again (a second Ctrl-C): stopped at once, without a last save{dropped}; {kept}"
