"""A second home for checkpoints: any store fsspec reaches (s3://, gs://, az://, file:// for a mounted drive).

`checkpoint.remote` stands in for train.out_dir: a run's checkpoints go to <remote>/<run_name>/checkpoints/, laid
out as on the local disk (step_N/ with its files and manifest.json, and `latest`). The rules of every Storage hold:
a checkpoint is complete when its manifest is there (uploaded last, after every file it lists), and `latest` names
the newest complete one. fsspec and the cloud's own package (s3fs, gcsfs, adlfs) come with `pip install -e '.[cloud]'`.
"""

from __future__ import annotations

import os
from pathlib import Path

from dist_gpt.checkpoint.storage import Storage
from dist_gpt.errors import UserError

CREDENTIAL_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "AZURE_STORAGE_KEY", "AZURE_STORAGE_CONNECTION_STRING")


def is_url(path: str | Path) -> bool:
    return "://" in str(path)


def describe_remote_error(error: BaseException) -> str:
    """One short line for an error from a store, credentials never included (a message could echo them)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    for variable in CREDENTIAL_VARIABLES:
        secret = os.environ.get(variable)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


class RemoteStorage(Storage):
    """A directory in a store fsspec can reach. Credentials come from the store's usual places (AWS_* variables,
    ~/.aws, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_*...): nothing about them is in the config."""

    def __init__(self, url: str):
        try:
            import fsspec
        except ImportError:
            raise UserError(f"checkpoint.remote={url} needs fsspec and the store's package: pip install -e '.[cloud]'") from None
        self.url = url.rstrip("/")
        try:
            # A new client each time (one made earlier, for another endpoint or other credentials, is never reused),
            # and no cached listings: other ranks and processes write here, and s3fs would answer a read of a file
            # written since its last listing of the directory with FileNotFoundError.
            self.fs, self.root = fsspec.core.url_to_fs(self.url, skip_instance_cache=True, use_listings_cache=False)
        except (ImportError, ValueError) as e:  # an unknown protocol, or its package (s3fs, gcsfs, adlfs) missing
            raise UserError(f"checkpoint.remote={url}: {describe_remote_error(e)}; pip install -e '.[cloud]' brings s3fs, gcsfs and adlfs") from None
        self.root = self.root.rstrip("/")
        self.on_local_disk = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}" if name else self.root

    def location(self, name: str = "") -> str:
        return f"{self.url}/{name}" if name else self.url

    def check(self) -> None:
        """One cheap call that fails now, with one line, if the bucket or the credentials are wrong."""
        try:
            if self.on_local_disk:
                self.fs.makedirs(self.root, exist_ok=True)
                return
            try:
                self.fs.ls(self.root)
            except FileNotFoundError:  # no run here yet: is the bucket itself there?
                self.fs.invalidate_cache()
                self.fs.ls(self.root.split("/")[0])
        except FileNotFoundError:
            raise UserError(f"checkpoint.remote ({self.url}): the bucket {self.root.split('/')[0]!r} does not exist (or this key may not see it): create it, or fix the URL") from None
        except Exception as e:  # noqa: BLE001 - botocore, google-auth, azure: each its own exception types
            raise UserError(
                f"checkpoint.remote ({self.url}) is not usable ({describe_remote_error(e)}): check the credentials (AWS_*, GOOGLE_APPLICATION_CREDENTIALS, "
                f"AZURE_STORAGE_*), the endpoint and the bucket, or set checkpoint.remote='' to train without a remote copy"
            ) from None

    def read_text(self, name: str) -> str | None:
        try:
            return self.fs.cat_file(self._path(name)).decode()
        except FileNotFoundError:
            return None

    def write_text(self, name: str, text: str) -> None:
        if self.on_local_disk:  # a file system: write aside, then rename (a reader never sees half a file)
            self.fs.makedirs(self._path(name).rsplit("/", 1)[0], exist_ok=True)
            self.fs.pipe_file(self._path(name) + ".tmp", text.encode())
            self.fs.mv(self._path(name) + ".tmp", self._path(name))
        else:  # an object store replaces an object whole
            self.fs.pipe_file(self._path(name), text.encode())

    def put_file(self, local: Path, name: str) -> None:
        if self.on_local_disk:
            self.fs.makedirs(self._path(name).rsplit("/", 1)[0], exist_ok=True)
        self.fs.put_file(str(local), self._path(name))

    def get_file(self, name: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        self.fs.get_file(self._path(name), str(local))

    def list_names(self) -> list[str]:
        return self._list("")

    def sizes(self, name: str) -> dict[str, int]:
        """{file name: size in bytes} of the files in directory `name` (what the uploader checks against a manifest)."""
        self.fs.invalidate_cache()  # another rank may have written since the last listing
        try:
            entries = self.fs.ls(self._path(name), detail=True)
        except FileNotFoundError:
            return {}
        return {entry["name"].rstrip("/").rsplit("/", 1)[-1]: int(entry["size"]) for entry in entries if entry["type"] == "file"}

    def _list(self, name: str) -> list[str]:
        self.fs.invalidate_cache()
        try:
            return sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in self.fs.ls(self._path(name), detail=False))
        except FileNotFoundError:
            return []

    def delete_checkpoint(self, name: str) -> None:
        # The manifest first: a kill in the middle of the delete leaves an incomplete step_N (no manifest, never
        # resumed from, removed by the next prune), never one that has its manifest but lacks some of its files.
        from dist_gpt.checkpoint.manifest import MANIFEST

        try:
            self.fs.rm_file(self._path(f"{name}/{MANIFEST}"))
        except FileNotFoundError:
            pass
        try:
            self.fs.rm(self._path(name), recursive=True)
        except FileNotFoundError:
            pass
