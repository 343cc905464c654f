"""KV-cache capacity accounting in fixed-size blocks (tokens per block), per replica."""

from __future__ import annotations

import numpy as np


class KvPool:
    """Block accounting for one replica's KV memory. Never allocates beyond `capacity_blocks`."""

    def __init__(self, capacity_tokens: int, block_size: int):
        self.block_size = block_size
        self.capacity_blocks = int(capacity_tokens // block_size)
        self.used_blocks = 0

    @property
    def capacity_tokens(self) -> int:
        return self.capacity_blocks * self.block_size

    @property
    def free_blocks(self) -> int:
        return self.capacity_blocks - self.used_blocks

    def blocks(self, tokens):
        """Blocks needed to hold `tokens` tokens (scalar or array)."""
        return -(-np.asarray(tokens, dtype=np.int64) // self.block_size)

    def allocate(self, n_blocks: int) -> None:
        if n_blocks > self.free_blocks:
            raise RuntimeError(f"KV over-commit: {n_blocks} blocks requested, {self.free_blocks} free")
        self.used_blocks += int(n_blocks)

    def free(self, n_blocks: int) -> None:
        if n_blocks > self.used_blocks:
            raise RuntimeError(f"KV double free: {n_blocks} blocks freed, {self.used_blocks} in use")
        self.used_blocks -= int(n_blocks)

    def growth_steps(self, stored: np.ndarray, max_steps: int) -> int:
        """Largest k <= max_steps such that k decode steps (one token per request each) fit in memory.

        `stored` are the tokens currently held per running request (their blocks are allocated).
        """
        base = int(self.blocks(stored).sum())
        if max_steps <= 0:
            return 0
        lo, hi = 0, max_steps  # invariant: lo steps fit
        if int(self.blocks(stored + hi).sum()) - base <= self.free_blocks:
            return hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if int(self.blocks(stored + mid).sum()) - base <= self.free_blocks:
                lo = mid
            else:
                hi = mid
        return lo
