"""Where published checkpoints live, behind one small interface: the run's own disk first (LocalStorage), and any
store that can hold the same files (object storage implements the same methods).

Names are relative to the checkpoints root and use "/": `latest`, `step_000500/manifest.json`. A checkpoint is
complete in a store when its manifest is there (the manifest is written last, after every file it lists), and
`latest` names the newest complete one; both rules hold for every store, so the same code finds, verifies and
prunes checkpoints wherever they are.
"""

from __future__ import annotations

import os
import re
import shutil
from abc import ABC, abstractmethod
from pathlib import Path

from dist_gpt.runtime.safe_write import write_atomically

STEP_DIR = re.compile(r"step_(\d+)$")  # a published checkpoint's directory (step_N.tmp and the like are not)


class Storage(ABC):
    """The operations checkpointing needs from a store of checkpoint files."""

    @abstractmethod
    def location(self, name: str = "") -> str:
        """Where `name` is, for messages (a path or a URL)."""

    @abstractmethod
    def read_text(self, name: str) -> str | None:
        """The file's text, or None when it does not exist."""

    @abstractmethod
    def write_text(self, name: str, text: str) -> None:
        """Replace the file as a whole: a reader sees the old text or the new, never a part."""

    @abstractmethod
    def put_file(self, local: Path, name: str) -> None:
        """Copy a local file into the store as `name`."""

    @abstractmethod
    def get_file(self, name: str, local: Path) -> None:
        """Copy `name` out of the store into the local path `local`."""

    @abstractmethod
    def list_names(self) -> list[str]:
        """The names of the entries at the root (checkpoint directories, `latest`)."""

    @abstractmethod
    def delete_checkpoint(self, name: str) -> None:
        """Remove the checkpoint directory `name` and everything in it."""

    def checkpoints(self) -> list[str]:
        """The published (step_N) checkpoint directories, oldest first; complete or not: see `is_complete`."""
        steps = [name for name in self.list_names() if STEP_DIR.match(name)]
        return sorted(steps, key=lambda name: int(STEP_DIR.match(name)[1]))

    def is_complete(self, name: str) -> bool:
        from dist_gpt.checkpoint.manifest import MANIFEST

        return self.read_text(f"{name}/{MANIFEST}") is not None

    def latest(self) -> str | None:
        """The checkpoint `latest` names, or None."""
        from dist_gpt.checkpoint.manifest import LATEST

        text = self.read_text(LATEST)
        return text.strip() if text else None


class LocalStorage(Storage):
    """A directory on a local (or mounted) file system: out/<run>/checkpoints."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def location(self, name: str = "") -> str:
        return str(self.root / name) if name else str(self.root)

    def read_text(self, name: str) -> str | None:
        try:
            return (self.root / name).read_text()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def write_text(self, name: str, text: str) -> None:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, text)

    def put_file(self, local: Path, name: str) -> None:
        target = self.root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, target)

    def get_file(self, name: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.root / name, local)

    def list_names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir()) if self.root.is_dir() else []

    def delete_checkpoint(self, name: str) -> None:
        # Out of the step_N namespace first (one atomic rename), then deleted: a kill in the middle of the delete
        # leaves a step_N.old.tmp, which the next save removes, never a step_N that has its manifest but lacks
        # some of its shards.
        doomed = self.root / (name + ".old.tmp")
        shutil.rmtree(doomed, ignore_errors=True)
        if (self.root / name).exists():
            os.replace(self.root / name, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
