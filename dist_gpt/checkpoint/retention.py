"""checkpoint.keep_last_k: after a new checkpoint is published, the older ones beyond the newest k go, in any store."""

from __future__ import annotations

from dist_gpt.checkpoint.storage import Storage


def prune(storage: Storage, keep_last_k: int, keep: str | tuple[str, ...]) -> list[str]:
    """Keep the first of `keep` (the one just published) and the keep_last_k - 1 before it, and the others of
    `keep` (one still being uploaded); delete the older ones of `storage`. Never one newer than the one just
    published (a run that went back to an older checkpoint after its latest was found damaged): those are not
    this save's to judge. Returns the names deleted."""
    keep = (keep,) if isinstance(keep, str) else keep
    names = storage.checkpoints()  # oldest first
    older = names[: names.index(keep[0])] if keep[0] in names else names
    doomed = [name for name in older[: max(0, len(older) - (keep_last_k - 1))] if name not in keep]
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
