"""checkpoint.keep_last_k: after a new checkpoint is published, the older ones beyond the newest k go, in any store."""

from __future__ import annotations

from dist_gpt.checkpoint.storage import Storage


def prune(storage: Storage, keep_last_k: int, keep: str | tuple[str, ...]) -> list[str]:
    """Delete all but the newest keep_last_k checkpoint directories of `storage`, never `keep` (the one just
    published; and one still being uploaded). Returns the names deleted."""
    keep = (keep,) if isinstance(keep, str) else keep
    doomed = [name for name in storage.checkpoints()[:-keep_last_k] if name not in keep]
    for name in doomed:
        storage.delete_checkpoint(name)
    return doomed


def prune_incomplete(storage: Storage, older_than: str) -> list[str]:
    """Delete the checkpoint directories older than `older_than` that never got their manifest (in a remote
    store: an upload cut short by a kill, or given up for a newer checkpoint). Newer ones may be on their way."""
    names = storage.checkpoints()
    doomed = [name for name in names[: names.index(older_than)] if not storage.is_complete(name)] if older_than in names else []
    for name in doomed:
        storage.delete_checkpoint(name)
    return doomed
