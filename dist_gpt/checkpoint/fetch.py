"""Checkpoints out of the remote store onto this machine's disk, so the ordinary local resume (or export) runs.

A resuming node needs every file of the checkpoint, not only the ones its ranks wrote: on another world size a
rank reads pieces of any shard, and the resume verifies every file's CRC. The node's ranks share the downloads
(local rank i fetches every n-th file), into step_N.download.tmp (a stale one is removed by the next save), then
local rank 0 verifies the whole directory against the manifest, renames it to step_N and points `latest` at it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from dist_gpt.checkpoint.manifest import LATEST, MANIFEST, read_manifest, verify_files
from dist_gpt.checkpoint.remote import RemoteStorage, describe_remote_error
from dist_gpt.checkpoint.storage import STEP_DIR, LocalStorage
from dist_gpt.errors import UserError
from dist_gpt.runtime.safe_write import write_atomically


def step_of(name: str | None) -> int:
    return int(STEP_DIR.match(name)[1]) if name and STEP_DIR.match(name) else -1


def newest_complete(storage) -> str | None:
    """The checkpoint `latest` names, if it is complete there; else (no `latest`, or one naming a checkpoint
    deleted by hand) the newest complete one listed; None if there is none."""
    name = storage.latest()
    if name and storage.is_complete(name):
        return name
    complete = [c for c in storage.checkpoints() if storage.is_complete(c)]
    return complete[-1] if complete else None


def download(remote: RemoteStorage, name: str, local_root: Path, local_rank: int = 0, local_world_size: int = 1, barrier=lambda: None) -> Path:
    """Copy checkpoint `name` into local_root/name and make it the local `latest`; every local rank calls this."""
    manifest_text = remote.read_text(f"{name}/{MANIFEST}")
    if manifest_text is None:
        raise UserError(f"{remote.location(name)} has no {MANIFEST}: it is not a complete checkpoint")
    files = sorted(json.loads(manifest_text)["files"])
    staging = local_root / f"{name}.download.tmp"
    error = None
    try:
        for file in files[local_rank::local_world_size]:
            remote.get_file(f"{name}/{file}", staging / file)
    except Exception as e:  # noqa: BLE001 - any store error
        error = describe_remote_error(e)
    barrier()  # every local rank's share is there (or failed) before it is checked
    final = local_root / name
    if local_rank == 0:
        if error is None:
            write_atomically(staging / MANIFEST, manifest_text)
            try:
                verify_files(staging, read_manifest(staging))
            except UserError as e:
                error = str(e)
        if error is None:
            if final.exists():  # an incomplete or older copy of the same step: the complete remote one replaces it
                shutil.rmtree(final)
            os.replace(staging, final)
            write_atomically(local_root / LATEST, name)
        else:
            shutil.rmtree(staging, ignore_errors=True)
    barrier()
    if error is not None or not (final / MANIFEST).is_file():
        raise UserError(f"could not download {remote.location(name)} ({error or 'on another rank'}): check the store, or resume from a local checkpoint with checkpoint.resume=PATH")
    return final


def remote_checkpoint(url: str) -> tuple[RemoteStorage, str]:
    """A remote run (its dir or checkpoints/ dir: the latest) or one step_N dir, to (its checkpoints store, name)."""
    url = url.rstrip("/")
    parent, _, last = url.rpartition("/")
    if STEP_DIR.match(last):
        return RemoteStorage(parent), last
    for root in (url, f"{url}/checkpoints"):
        storage = RemoteStorage(root)
        latest = newest_complete(storage)
        if latest:
            return storage, latest
    raise UserError(f"no complete checkpoint at {url}: give a run's URL (<checkpoint.remote>/<run name>), its checkpoints/, or a step_* URL")


def newer_remote(local_root: Path, remote: RemoteStorage) -> str | None:
    """The remote's newest complete checkpoint if it is newer than the local one (or there is none locally)."""
    local, newest = LocalStorage(local_root).latest(), newest_complete(remote)  # locally, what the resume reads
    return newest if step_of(newest) > step_of(local) else None
