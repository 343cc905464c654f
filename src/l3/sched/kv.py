"""KV-cache capacity accounting in fixed-size blocks (tokens per block), per replica.

A replica's KV memory may have several tiers (e.g. GPU HBM and host DRAM for NEO-style CPU offloading); a
request's blocks all live in one tier. Most systems have one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Tiers of a two-tier pool (NEO-style CPU offloading): the GPUs' spare HBM, then the attention device's memory.
HBM_TIER, DEVICE_TIER = 0, 1


class KvPool:
    """Block accounting for one replica's KV memory. Never allocates beyond a tier's capacity."""

    def __init__(self, capacity_tokens: int | Sequence[int], block_size: int):
        self.block_size = block_size
        self.tier_capacity = np.atleast_1d(np.asarray(capacity_tokens, np.int64)) // block_size  # blocks
        self.tier_used = np.zeros(len(self.tier_capacity), np.int64)

    @property
    def tiers(self) -> int:
        return len(self.tier_capacity)

    @property
    def capacity_blocks(self) -> int:
        return int(self.tier_capacity.sum())

    @property
    def used_blocks(self) -> int:
        return int(self.tier_used.sum())

    @property
    def capacity_tokens(self) -> int:
        return self.capacity_blocks * self.block_size

    @property
    def free_blocks(self) -> int:
        return self.capacity_blocks - self.used_blocks

    def free_in(self, tier: int) -> int:
        return int(self.tier_capacity[tier] - self.tier_used[tier])

    def blocks(self, tokens):
        """Blocks needed to hold `tokens` tokens (scalar or array)."""
        return -(-np.asarray(tokens, dtype=np.int64) // self.block_size)

    def per_tier(self, tiers: np.ndarray, blocks: np.ndarray) -> np.ndarray:
        """Blocks summed per tier."""
        return np.bincount(tiers, weights=blocks, minlength=self.tiers).astype(np.int64)

    def allocate(self, n_blocks: int, tier: int = 0) -> None:
        if n_blocks > self.free_in(tier):
            raise RuntimeError(f"KV over-commit: {n_blocks} blocks requested, {self.free_in(tier)} free in tier {tier}")
        self.tier_used[tier] += int(n_blocks)

    def free(self, n_blocks: int, tier: int = 0) -> None:
        if n_blocks > self.tier_used[tier]:
            raise RuntimeError(f"KV double free: {n_blocks} blocks freed, {self.tier_used[tier]} in use in tier {tier}")
        self.tier_used[tier] -= int(n_blocks)

    def growth_steps(self, stored: np.ndarray, tiers: np.ndarray, max_steps: int) -> int:
        """Largest k <= max_steps such that k decode steps (one token per request each) fit in memory.

        `stored` are the tokens currently held per running request (their blocks are allocated), `tiers` their tiers.
        """
        if max_steps <= 0:
            return 0
        base = self.per_tier(tiers, self.blocks(stored))
        free = self.tier_capacity - self.tier_used

        def fits(k: int) -> bool:
            return bool(np.all(self.per_tier(tiers, self.blocks(stored + k)) - base <= free))

        lo, hi = 0, max_steps  # invariant: lo steps fit
        if fits(hi):
            return hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid
        return lo


class BlockTables:
    """Physical KV blocks of each request, per tier (paged, as an engine needs them): a request's table lists its
    blocks in token order; token j lies in block table[j // block_size] at offset j % block_size. Block ids
    are numbered per tier from 0 to its capacity - 1. `KvPool` counts blocks for the scheduler's decisions;
    these tables say where they are, and never hand out more blocks than a tier holds."""

    def __init__(self, pool: KvPool):
        self.block_size = pool.block_size
        self._free = [list(range(int(c) - 1, -1, -1)) for c in pool.tier_capacity]  # pop() gives low ids first
        self.tables: dict[int, list[int]] = {}
        self.tier: dict[int, int] = {}

    def ensure(self, rid: int, tier: int, tokens: int) -> list[int]:
        """Request `rid`'s table, grown to hold `tokens` tokens in `tier` (where all its blocks are)."""
        table = self.tables.setdefault(rid, [])
        if self.tier.setdefault(rid, tier) != tier:
            raise RuntimeError(f"request {rid} holds blocks in tier {self.tier[rid]}, not {tier}")
        need = -(-tokens // self.block_size) - len(table)
        if need > len(self._free[tier]):
            raise RuntimeError(f"KV over-commit: {need} blocks wanted in tier {tier}, {len(self._free[tier])} free")
        table.extend(self._free[tier].pop() for _ in range(max(need, 0)))
        return table

    def release(self, rid: int) -> None:
        """Return all of a request's blocks (finished, preempted or moved)."""
        table = self.tables.pop(rid, [])
        self._free[self.tier.pop(rid, 0)].extend(reversed(table))

    def free_blocks(self, tier: int) -> int:
        return len(self._free[tier])
