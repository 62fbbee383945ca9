"""Random training windows from a uint16 token file, deterministic and resumable across world sizes.

The stream: window number j (j = 0, 1, 2, ...) starts at offset hash(seed, j) mod (tokens - block_size), a
counter-based hash (splitmix64), so any window can be computed without replaying the ones before it. Each
optimizer micro-step consumes world_size x micro_batch_size consecutive window numbers; rank r takes its own
micro_batch_size of them (numbers base + r*B ... base + r*B + B-1). Ranks therefore read disjoint parts of one
global stream, and together they read exactly what a single process with world_size x B rows would.

The state is just (seed, windows consumed). A checkpoint taken with 4 ranks and loaded by 2 (or 1, or 8)
continues the same global stream from the same window: the windows are the same, only dealt out to ranks
differently. The stream also depends on the file's length and block_size: resuming on other data or another
block_size continues deterministically, but it is a different stream.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dist_gpt.errors import UserError

TOKEN_DTYPE = np.uint16
_MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A bijective 64-bit mixer (Steele et al., SplitMix): consecutive counters -> unrelated 64-bit values."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps around, which is the point
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def window_offsets(seed: int, window_numbers: np.ndarray, num_windows: int) -> np.ndarray:
    """Start offsets of the given windows (numbers 0, 1, 2, ... of the stream for `seed`)."""
    key = _splitmix64(np.array([seed & _MASK64], dtype=np.uint64))
    counters = np.asarray(window_numbers, dtype=np.uint64)
    with np.errstate(over="ignore"):
        # the key is a random-looking 64-bit number, so the counter ranges of two seeds never overlap in practice
        mixed = _splitmix64(counters + key)
    return (mixed % np.uint64(num_windows)).astype(np.int64)


class TokenLoader:
    """`next_batch()` -> (x, y), int64 (micro_batch_size, block_size) tensors on `device`; y is x shifted by one."""

    def __init__(
        self,
        bin_path: str | Path,
        block_size: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        device: torch.device = torch.device("cpu"),
    ):
        self.bin_path = Path(bin_path)
        if not self.bin_path.is_file():
            raise UserError(f"no prepared data at {self.bin_path}: run python -m dist_gpt.prepare --dataset ... --out {self.bin_path.parent}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.tokens = np.memmap(self.bin_path, dtype=TOKEN_DTYPE, mode="r")
        if len(self.tokens) < block_size + 1:
            raise UserError(
                f"{self.bin_path}: data has {len(self.tokens):,} tokens, fewer than block_size+1 = {block_size + 1}; "
                "lower model.block_size (or use more data)"
            )
        self.block_size, self.micro_batch_size = block_size, micro_batch_size
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.device = torch.device(device)
        self.windows_consumed = 0  # by all ranks together
        # every start from 0 to len - (block_size+1) inclusive: the last token is only ever a target
        self.num_windows = len(self.tokens) - block_size

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.windows_consumed + self.rank * self.micro_batch_size
        self.windows_consumed += self.world_size * self.micro_batch_size
        return self.windows(np.arange(first, first + self.micro_batch_size))

    def windows(self, numbers: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch made of the given window numbers of this loader's stream (any count), without moving
        the stream: evaluation uses it to deal one fixed set of windows out to the ranks."""
        offsets = window_offsets(self.seed, numbers, self.num_windows)
        rows = np.stack([self.tokens[o : o + self.block_size + 1] for o in offsets]).astype(np.int64)
        x, y = torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())  # contiguous, as .view needs
        if self.device.type == "cuda":
            # page-locked memory lets the copies run asynchronously, overlapping the previous step's compute
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "windows_consumed": self.windows_consumed}

    def load_state_dict(self, state: dict) -> None:
        """Continue the saved stream (its seed wins over the constructor's: a resume must not change the data
        order). Any world size and micro-batch size can load it."""
        self.seed = int(state["seed"])
        self.windows_consumed = int(state["windows_consumed"])
