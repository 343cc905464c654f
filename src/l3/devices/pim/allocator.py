"""Per-rank row-stripe allocator for the KV cache of the DIMM-PIM device.

Unit: a row stripe = one row index in every bank of every chip of one rank (`KvLayout.stripe_bytes`, 128 KiB
on DDR4 x8). Each (request, layer, head round, K|V) owns a list of stripes, filled token by token as
`mapping.slot_of` says; a new stripe is taken only when the last one is full, so at most one stripe per
(request, layer, round, K|V) is partly filled: the fragmentation bound is 2 * rounds stripes per (request,
layer), less than `tokens_per_stripe` tokens of slack per list.

Placement: a request's channel position is fixed at its first reservation (the channel with the fewest
allocated stripes, ties to the lowest index); layer l then lives in rankset (l + request) mod R of that
channel. Each rank keeps a high-water mark and a stack of freed rows, so memory grows with what is allocated,
never with the rank's row count (262144 rows per bank on the 2 TB platform costs nothing up front).

Refusal: `try_reserve` returns False and `reserve` raises PimCapacityError when the target rank lacks the
stripes; in both cases nothing changes (not even the request's channel choice).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from l3.devices.pim.mapping import KvLayout, Placement, rank_of
from l3.errors import L3Error


class PimCapacityError(L3Error):
    """The target rank has too few free row stripes for the KV being appended (state unchanged)."""


@dataclass
class _RankPool:
    limit: int  # rows usable per bank
    next_row: int = 0  # rows [next_row, limit) never handed out yet
    freed: list[int] = field(default_factory=list)

    @property
    def available(self) -> int:
        return self.limit - self.next_row + len(self.freed)

    def take(self, n: int) -> np.ndarray:
        reused = min(n, len(self.freed))
        rows = self.freed[len(self.freed) - reused :]
        del self.freed[len(self.freed) - reused :]
        fresh = np.arange(self.next_row, self.next_row + n - reused, dtype=np.int64)
        self.next_row += n - reused
        return np.concatenate([np.asarray(rows, dtype=np.int64), fresh])


@dataclass
class _Entry:
    tokens: int
    placement: Placement


class KvAllocator:
    """Row stripes of every rank, handed to (request, layer) KV as tokens are appended."""

    def __init__(self, layout: KvLayout, n_layers: int, max_rows: int | None = None):
        """`max_rows` caps the rows per bank that may be used (default: all `layout.rows`)."""
        if n_layers < 1:
            raise ValueError("n_layers must be >= 1")
        self.layout = layout
        self.n_layers = n_layers
        self.rows_per_rank = layout.rows if max_rows is None else min(max_rows, layout.rows)
        n_ranks = layout.channels * layout.ranks_per_channel
        self._pools = [_RankPool(self.rows_per_rank) for _ in range(n_ranks)]
        self._used = np.zeros(n_ranks, dtype=np.int64)  # stripes held per global rank
        self._channel: dict[int, int] = {}
        self._entries: dict[tuple[int, int], _Entry] = {}

    # --- queries -----------------------------------------------------------------------------------
    def channel_of(self, request: int) -> int | None:
        """Channel position of a request, None before its first reservation or after `free`."""
        return self._channel.get(request)

    def tokens(self, request: int, layer: int) -> int:
        """Tokens reserved so far for (request, layer); 0 if none."""
        entry = self._entries.get((request, layer))
        return 0 if entry is None else entry.tokens

    def placement(self, request: int, layer: int) -> Placement:
        """Rank and stripes of (request, layer); L3Error if nothing was reserved for it."""
        entry = self._entries.get((request, layer))
        if entry is None:
            raise L3Error(f"request {request} has no KV for layer {layer}")
        return entry.placement

    def used_stripes(self) -> np.ndarray:
        """Stripes held per global rank (channel-major: rank = channel * R + rankset)."""
        return self._used.copy()

    def free_stripes(self) -> np.ndarray:
        """Stripes still available per global rank."""
        return np.array([p.available for p in self._pools], dtype=np.int64)

    # --- changes -----------------------------------------------------------------------------------
    def try_reserve(self, request: int, layer: int, n_tokens: int) -> bool:
        """Make room for `n_tokens` more tokens of (request, layer); False (state unchanged) if full."""
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} outside [0, {self.n_layers})")
        if n_tokens < 0:
            raise ValueError("n_tokens must be >= 0")
        lay = self.layout
        channel = self._channel.get(request)
        if channel is None:
            per_channel = self._used.reshape(lay.channels, lay.ranks_per_channel).sum(axis=1)
            channel = int(np.argmin(per_channel))
        rankset, rank = rank_of(lay, request, layer, channel)
        entry = self._entries.get((request, layer))
        tokens = 0 if entry is None else entry.tokens
        have = lay.stripes_for(tokens)
        extra = lay.stripes_for(tokens + n_tokens) - have
        pool = self._pools[rank]
        if 2 * lay.rounds * extra > pool.available:
            return False
        new_rows = pool.take(2 * lay.rounds * extra).reshape(lay.rounds, 2, extra)
        old_rows = np.empty((lay.rounds, 2, 0), np.int64) if entry is None else entry.placement.rows
        rows = np.concatenate([old_rows, new_rows], axis=2)
        self._used[rank] += new_rows.size
        self._channel[request] = channel
        self._entries[request, layer] = _Entry(tokens + n_tokens, Placement(channel, rankset, rank, rows))
        return True

    def reserve(self, request: int, layer: int, n_tokens: int) -> Placement:
        """`try_reserve` that raises PimCapacityError when full; returns the (new) placement."""
        if not self.try_reserve(request, layer, n_tokens):
            lay = self.layout
            channel = self._channel.get(request)
            where = "its channel" if channel is not None else "the least-used channel"
            raise PimCapacityError(
                f"no room for {n_tokens} more tokens of request {request} layer {layer}: rankset "
                f"{(layer + request) % lay.ranks_per_channel} of {where} is out of row stripes"
            )
        return self._entries[request, layer].placement

    def free(self, request: int) -> int:
        """Release every stripe of a request (any layer); returns how many. Unknown request: 0."""
        released = 0
        for layer in range(self.n_layers):
            entry = self._entries.pop((request, layer), None)
            if entry is None:
                continue
            rank = entry.placement.rank
            self._pools[rank].freed.extend(entry.placement.rows.ravel().tolist())
            self._used[rank] -= entry.placement.rows.size
            released += entry.placement.rows.size
        self._channel.pop(request, None)
        return released
