"""Resuming: which checkpoint `checkpoint.resume` names, and loading it into the strategy and the run's parts."""

from __future__ import annotations

from pathlib import Path

from dist_gpt.checkpoint.manifest import check_model_shape, read_manifest, resolve_checkpoint_dir, verify_files
from dist_gpt.checkpoint.rng import restore_rng_state
from dist_gpt.checkpoint.storage import Storage
from dist_gpt.config import Config
from dist_gpt.errors import UserError
from dist_gpt.runtime.distributed import DistEnv, barrier


def checkpoint_to_resume(config: Config, storage: Storage) -> Path | None:
    """The checkpoint directory to resume from (checkpoint.resume: auto = this run's latest, if any; never; a
    PATH), or None for a fresh start. Raises UserError when never would overwrite checkpoints."""
    mode = config.checkpoint.resume
    has_latest = storage.latest() is not None
    if mode == "never":
        if has_latest:
            raise UserError(
                f"{config.run_dir} already has checkpoints and checkpoint.resume=never would overwrite them: "
                f"choose a new train.run_name, or resume with checkpoint.resume=auto"
            )
        return None
    if mode == "auto":
        return resolve_checkpoint_dir(storage.location()) if has_latest else None
    return resolve_checkpoint_dir(mode)


def load_checkpoint(ckpt_dir: Path, config: Config, env: DistEnv, strategy, parts: dict) -> bool:
    """Load ckpt_dir into the strategy (model + optimizer, resharded to this world) and `parts` (objects with
    load_state_dict: the data loader, the loop's state...). Returns whether this rank's RNG stream was restored."""
    manifest = read_manifest(ckpt_dir)
    check_model_shape(ckpt_dir, manifest, config)
    if env.is_main:
        verify_files(ckpt_dir, manifest)
    barrier()
    strategy.load_checkpoint(ckpt_dir, manifest)
    for name, part in parts.items():
        if name in manifest["parts"]:  # a part newer than the checkpoint (the fp16 loss scaler) starts fresh
            part.load_state_dict(manifest["parts"][name])
    return restore_rng_state(ckpt_dir, env.rank, env.device)
