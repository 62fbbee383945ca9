"""The reader of our own checkpoints: a run directory, its checkpoints/ directory (-> the latest) or one step_N
directory, here or in object storage -> the GPT it holds, consolidated in one process whatever strategy and world
size saved it.
`sample --ckpt RUN`, `export RUN` and `model.init_from=RUN` (fine-tuning a run's weights) read here.
The writer is the trainer's Checkpointer (checkpoint/): a checkpoint also holds the optimizer, RNG and data
position, which only resuming a run needs."""

from __future__ import annotations

import os
from pathlib import Path

from dist_gpt.checkpoint.consolidate import consolidated_state_dict
from dist_gpt.checkpoint.manifest import LATEST, MANIFEST
from dist_gpt.checkpoint.remote import is_url
from dist_gpt.interop.shared import build_checked
from dist_gpt.model import GPT


def is_checkpoint(source: str | os.PathLike) -> bool:
    """What looks like a checkpoint (its problems, a missing manifest say, are then the checkpoint's errors); a URL
    (s3://, gs://...: a run's remote copy, checkpoint.remote) is downloaded first."""
    if is_url(source):
        return True
    path = Path(source)
    if not path.is_dir():
        return False
    marks = (path / MANIFEST, path / LATEST, path / "checkpoints")
    return path.name.startswith("step_") or any(mark.exists() for mark in marks)


def load_checkpoint(source: str | os.PathLike, **overrides) -> GPT:
    """The model weights of the checkpoint at source (the run's config says the model), on the CPU in fp32;
    overrides as for shared.build_checked."""
    config, state_dict = consolidated_state_dict(source)
    saved = config.model.gpt_config()
    if saved.tie_embeddings:
        state_dict.pop("lm_head.weight", None)  # it is wte.weight
    return build_checked(saved, state_dict, overrides, source=source)
