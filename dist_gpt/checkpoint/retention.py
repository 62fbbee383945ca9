"""checkpoint.keep_last_k: after a new checkpoint is published, the older ones beyond the newest k go, in any store."""

from __future__ import annotations

from dist_gpt.checkpoint.storage import Storage


def prune(storage: Storage, keep_last_k: int, keep: str) -> list[str]:
    """Delete all but the newest keep_last_k checkpoint directories of `storage`, never `keep` (the one just
    published). Returns the names deleted."""
    doomed = [name for name in storage.checkpoints()[:-keep_last_k] if name != keep]
    for name in doomed:
        storage.delete_checkpoint(name)
    return doomed
