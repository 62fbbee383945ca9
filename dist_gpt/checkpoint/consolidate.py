"""The full model weights of any checkpoint in one process: the strategy that saved it consolidates its files."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from dist_gpt.checkpoint.fetch import download, remote_checkpoint
from dist_gpt.checkpoint.manifest import (
    read_manifest,
    resolve_checkpoint_dir,
    verify_files,
)
from dist_gpt.checkpoint.remote import is_url
from dist_gpt.config import Config
from dist_gpt.parallel import strategy_class


def consolidated_state_dict(path: str | Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """The full (unsharded) model weights of any checkpoint, in one process, with its run config: the
    strategy that saved it consolidates its own files (any world size)."""
    from dist_gpt.config import from_dict

    if is_url(path):  # a run in object storage (checkpoint.remote): downloaded, then consolidated as a local one
        with tempfile.TemporaryDirectory(prefix="dist_gpt_remote_") as local:
            storage, name = remote_checkpoint(str(path))
            print(f"downloading {storage.location(name)}", file=sys.stderr, flush=True)
            return consolidated_state_dict(download(storage, name, Path(local)))
    ckpt_dir = resolve_checkpoint_dir(path)
    manifest = read_manifest(ckpt_dir)
    verify_files(ckpt_dir, manifest)
    config = from_dict(manifest["config"])
    return config, strategy_class(manifest["strategy"]).consolidated_model_state(ckpt_dir, config)
