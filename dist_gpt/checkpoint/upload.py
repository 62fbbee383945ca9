"""The background upload of each published checkpoint to the remote store, while training goes on.

Every rank runs one Uploader thread and copies the files it wrote itself (no disk shared between nodes is
needed), checking each against the size and CRC32 it put into the manifest, then leaves a receipt,
step_N/upload_rank<r>.json, naming those files. Rank 0 waits for every rank's receipt, checks that together they
are the manifest's files with its sizes and checksums and that the store holds each at its size, uploads the
manifest (the checkpoint is now complete there), points the remote `latest` at it and prunes to keep_last_k. A
kill at any moment leaves the remote `latest` on a complete checkpoint.

The threads never join a collective (the training loop owns those): ranks meet through the store. When the store
is unreachable, the upload is retried with backoff until a newer checkpoint is given (then that one: the newest
first), and training is never held up; only a stop waits, see `wait`. Which checkpoint every rank uploads is
decided together by the caller (remote_copy.py): an upload in flight is never given up for a newer one, so
frequent saves cannot starve the uploads.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from dist_gpt.checkpoint import retention
from dist_gpt.checkpoint.manifest import LATEST, MANIFEST, file_crc32
from dist_gpt.checkpoint.remote import RemoteStorage, describe_remote_error

RECEIPT = "upload_rank{rank}.json"
POLL_SECONDS = 0.5  # rank 0, between looks for the other ranks' receipts
RETRY_FIRST_SECONDS, RETRY_MAX_SECONDS = 2.0, 60.0
RECEIPT_WAIT_SECONDS = 600.0  # rank 0 gives up on a checkpoint whose receipts do not all come (retried later)


class Superseded(Exception):
    """A newer checkpoint was published while this one was uploading: upload that one instead."""


class Uploader:
    def __init__(self, remote: RemoteStorage, local_root: Path, rank: int, session: str, keep_last_k: int):
        """session: the same string on every rank of this run (a receipt from an earlier process never counts)."""
        self.remote, self.local_root, self.rank, self.session, self.keep_last_k = remote, local_root, rank, session, keep_last_k
        self.cond = threading.Condition()
        self.wanted: tuple[str, dict] | None = None  # the newest published checkpoint and this rank's files in it
        self.uploaded: str | None = None  # the newest one this rank has finished (rank 0: manifest and `latest` too)
        self.error: str | None = None  # why the last attempt failed; None while uploads succeed
        self.sent: set[str] = set()  # "step_N/file" copied by this process (a retry does not copy them again)
        self.closed = False
        self.submitted_at = 0.0  # time.monotonic() of the newest submit
        self.longest_seconds = 0.0  # the longest upload so far, from its submit to done (rank 0: to `latest`)
        self.thread = threading.Thread(target=self._run, name="checkpoint-upload", daemon=True)
        self.thread.start()

    def submit(self, name: str, files: dict) -> None:
        """Upload checkpoint `name` (published locally); files: {file: [size, crc32]} this rank wrote."""
        with self.cond:
            self.wanted = (name, files)
            self.submitted_at = time.monotonic()
            self.cond.notify_all()

    @property
    def busy(self) -> bool:
        """Uploading, and not failing (a failing upload may be replaced by a newer checkpoint)."""
        with self.cond:
            return self.wanted is not None and self.wanted[0] != self.uploaded and self.error is None

    def in_flight(self) -> str | None:
        """The checkpoint being uploaded (its local copy must stay), or None."""
        with self.cond:
            return self.wanted[0] if self.wanted is not None and self.wanted[0] != self.uploaded else None

    def wait(self, seconds: float) -> str | None:
        """Wait up to `seconds` for the newest submitted checkpoint to be uploaded: None if it is, else why not."""
        deadline = time.monotonic() + seconds
        with self.cond:
            while self.wanted is not None and self.uploaded != self.wanted[0]:
                left = deadline - time.monotonic()
                if left <= 0:
                    return self.error or f"not finished within {seconds:.0f} s"
                self.cond.wait(min(left, 1.0))
        return None

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        delay = RETRY_FIRST_SECONDS
        while True:
            with self.cond:
                while not self.closed and (self.wanted is None or self.wanted[0] == self.uploaded):
                    self.cond.wait()
                if self.closed:
                    return
                name, files = self.wanted
            try:
                self._upload(name, files)
            except Superseded:
                continue
            except Exception as e:  # noqa: BLE001 - any store error: say it once, train on, retry later
                with self.cond:
                    if self.error is None and self.rank == 0:
                        print(f"warning: uploading {name} to {self.remote.location()} failed ({describe_remote_error(e)}); training goes on, the upload is retried", flush=True)
                    self.error = describe_remote_error(e)
                    self.cond.notify_all()
                    self.cond.wait(delay)  # a new checkpoint (or a close) ends the wait early: the newest goes first
                delay = min(2 * delay, RETRY_MAX_SECONDS)
                continue
            with self.cond:
                if self.error is not None and self.rank == 0:
                    print(f"{self.remote.location()} is reachable again", flush=True)
                self.uploaded, self.error = name, None
                self.longest_seconds = max(self.longest_seconds, time.monotonic() - self.submitted_at)
                self.cond.notify_all()
            delay = RETRY_FIRST_SECONDS

    def _superseded(self, name: str) -> bool:
        with self.cond:
            return self.closed or self.wanted is None or self.wanted[0] != name

    def _upload(self, name: str, files: dict) -> None:
        source = self.local_root / name
        if not source.is_dir() and (self.local_root / f"{name}.tmp").is_dir():
            source = self.local_root / f"{name}.tmp"  # a node without rank 0's disk: the rename happened over there
        for file, (size, crc) in sorted(files.items()):
            if f"{name}/{file}" in self.sent:
                continue
            path = source / file
            if not path.is_file() and self._superseded(name):  # a failing upload, replaced and pruned locally
                raise Superseded
            if path.stat().st_size != size or file_crc32(path) != crc:
                raise RuntimeError(f"{path} changed since its checksum went into the manifest")
            self.remote.put_file(path, f"{name}/{file}")
            self.sent.add(f"{name}/{file}")
        receipt = RECEIPT.format(rank=self.rank)
        if f"{name}/{receipt}" not in self.sent:
            self.remote.write_text(f"{name}/{receipt}", json.dumps({"session": self.session, "files": files}))
            self.sent.add(f"{name}/{receipt}")
        if self.rank == 0:
            self._complete(name, (source / MANIFEST).read_text(), files)

    def _complete(self, name: str, manifest_text: str, files: dict) -> None:
        """Rank 0: once every rank's files are there as the manifest lists them, the manifest, then `latest`."""
        manifest = json.loads(manifest_text)
        expected = manifest["files"]
        alone = files == expected  # rank 0 uploading a whole checkpoint (one only on this disk, found at the start)
        receipts = [RECEIPT.format(rank=r) for r in range(1 if alone else manifest["world_size"])]
        given_up = time.monotonic() + RECEIPT_WAIT_SECONDS
        while True:
            if self._superseded(name):
                raise Superseded
            listed = self.remote.sizes(name)
            if all(receipt in listed for receipt in receipts):
                reported = {}
                for receipt in receipts:
                    body = json.loads(self.remote.read_text(f"{name}/{receipt}") or "{}")
                    if body.get("session") == self.session:
                        reported.update(body["files"])
                if reported == expected:
                    break
            if time.monotonic() > given_up:
                raise TimeoutError(f"not every rank's files of {name} reached the store within {RECEIPT_WAIT_SECONDS:.0f} s")
            time.sleep(POLL_SECONDS)
        wrong = [f for f, (size, _) in expected.items() if listed.get(f) != size]
        if wrong:
            raise RuntimeError(f"{name}: {', '.join(wrong[:3])} in the store differ in size from the manifest")
        self.remote.write_text(f"{name}/{MANIFEST}", manifest_text)  # complete there from here on
        self.remote.write_text(LATEST, name)
        retention.prune(self.remote, self.keep_last_k, keep=name)  # the newest complete one is never deleted
        retention.prune_incomplete(self.remote, older_than=name)  # uploads cut short or superseded
        print(f"checkpoint uploaded: {self.remote.location(name)}", flush=True)
