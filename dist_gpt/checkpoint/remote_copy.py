"""A run's remote copy (checkpoint.remote), as the Checkpointer drives it: checked at the start, fetched from at
resume when it is newer than the local disk, fed each published checkpoint, waited for at the end.

Every method is called by every rank at the same point (the ones that agree use collectives); the uploads
themselves run in each rank's background thread (upload.py).
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

from dist_gpt.checkpoint.fetch import download, newer_remote, newest_complete, step_of
from dist_gpt.checkpoint.manifest import read_manifest
from dist_gpt.checkpoint.remote import RemoteStorage, describe_remote_error
from dist_gpt.checkpoint.storage import LocalStorage
from dist_gpt.checkpoint.upload import Uploader
from dist_gpt.config import Config
from dist_gpt.errors import UserError
from dist_gpt.runtime.distributed import (
    DistEnv,
    any_rank,
    barrier,
    broadcast_from_main,
    gather_objects,
)


def remote_run_url(config: Config) -> str:
    """checkpoint.remote stands in for train.out_dir: <remote>/<run name>/checkpoints."""
    return f"{config.checkpoint.remote.rstrip('/')}/{config.run_dir.name}/checkpoints"


class RemoteCopy:
    def __init__(self, config: Config, env: DistEnv, local_root: Path):
        """Opens the store and checks it with one cheap call (rank 0), before anything is trained: a wrong
        bucket or key is one line on every rank."""
        self.env, self.local_root = env, local_root
        self.storage = RemoteStorage(remote_run_url(config))
        error = None
        if env.is_main:
            try:
                self.storage.check()
            except UserError as e:
                error = str(e)
        error = broadcast_from_main(error)
        if error:
            raise UserError(error)
        self.newest = broadcast_from_main(self._newest() if env.is_main else None)  # for the start line
        self.waiting: tuple[str, dict] | None = None  # the newest published checkpoint, not yet given to the uploader
        self.uploader = Uploader(self.storage, local_root, env.rank, broadcast_from_main(uuid.uuid4().hex), config.checkpoint.keep_last_k)

    def _newest(self) -> str | None:
        try:
            return newest_complete(self.storage)
        except Exception as e:  # noqa: BLE001 - the check just passed; a flaky store is not worth a refused start
            print(f"warning: could not read {self.storage.location()} ({describe_remote_error(e)})", flush=True)
            return None

    def describe(self) -> str:
        """For the start line: where the newest remote copy is."""
        return f"remote {self.storage.location(self.newest)}" if self.newest else f"remote {self.storage.location()} (no checkpoint there yet)"

    def before_resume(self, mode: str) -> None:
        """checkpoint.resume=never: refuse to overwrite the remote's checkpoints; auto: fetch the remote's newest
        when it is newer than the local one, for the local resume to read."""
        if mode == "never" and self.newest:
            raise UserError(
                f"{self.storage.location()} already has checkpoints and checkpoint.resume=never would overwrite them: "
                f"choose a new train.run_name, or resume with checkpoint.resume=auto"
            )
        if mode == "auto" and not self.fetch_if_newer():
            self.upload_if_only_local()

    def upload_if_only_local(self) -> None:
        """The local checkpoint is newer than the remote's (its upload was cut short by a crash): rank 0 uploads
        it whole now, in the background, so that even a run that has nothing left to train gets its copy."""
        if not self.env.is_main:
            return
        local = LocalStorage(self.local_root).latest()  # what the local resume reads
        if step_of(local) > step_of(self.newest):
            print(f"the newest checkpoint is only on this machine: uploading {local} to {self.storage.location()}", flush=True)
            self.uploader.submit(local, read_manifest(self.local_root / local)["files"])

    def fetch_if_newer(self) -> str | None:
        """Download the remote's newest complete checkpoint when it is newer than the local one (a fresh machine,
        or one whose disk is behind); the local resume then reads it. Returns its name, or None."""
        name = broadcast_from_main(newer_remote(self.local_root, self.storage) if self.env.is_main else None)
        if name is None:
            return None
        if self.env.is_main:
            print(f"the newest checkpoint is remote: downloading {self.storage.location(name)} to {self.local_root}", flush=True)
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        download(self.storage, name, self.local_root, self.env.local_rank % local_world, local_world, barrier=barrier)
        return name

    def submit(self, name: str, my_files: dict) -> None:
        """A checkpoint was just published locally (every rank calls this): this rank's files of it go up in the
        background, now if no rank is still uploading an earlier one, else after it (a newer one replaces it)."""
        if any_rank(self.uploader.busy)[0]:
            self.waiting = (name, my_files)
        else:
            self.uploader.submit(name, my_files)
            self.waiting = None

    def in_flight(self) -> tuple[str, ...]:
        """The checkpoint this rank is uploading, if any: the local retention keeps it until it is up."""
        name = self.uploader.in_flight()
        return (name,) if name else ()

    def finish(self, wait_seconds: float) -> str | None:
        """Wait (at most wait_seconds) for the last checkpoint's upload, on every rank; None when it is complete
        in the store, else why not (the same on every rank)."""
        deadline = time.monotonic() + wait_seconds
        error = self.uploader.wait(wait_seconds)
        if self.waiting is not None:  # the newest, held back while an earlier upload was in flight
            self.uploader.submit(*self.waiting)
            error = self.uploader.wait(max(0.0, deadline - time.monotonic()))
        self.uploader.close()
        if not any_rank(error is not None)[0]:
            return None
        errors = [e for e in gather_objects(error) if e]
        return errors[0] if errors else "another rank's upload did not finish"

    def where(self) -> str | None:
        """The checkpoint this process uploaded last (rank 0), or None."""
        return self.storage.location(self.uploader.uploaded) if self.uploader.uploaded else None
