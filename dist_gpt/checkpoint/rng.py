"""Each rank's random-number state, saved beside the shards so a resumed rank continues its stream (dropout)
bit for bit. Loaded with torch.load(weights_only=True): tensors only, never unpickled code."""

from __future__ import annotations

import re
from pathlib import Path

import torch

RNG_FILE = re.compile(r"rng_rank(\d+)\.pt$")  # one per rank, ours; the strategy's files are named by it


def rng_file_name(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(ckpt_dir: Path, rank: int, device: torch.device) -> bool:
    """Continue the stream rank `rank` saved; False when the checkpoint has no file for it (this run has more
    ranks than the one that saved: those reseed)."""
    path = ckpt_dir / rng_file_name(rank)
    if not path.is_file():
        return False
    state = torch.load(path, weights_only=True)
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    return True
