"""Functional model of DIMM-PIM decode attention: real bytes in banks, computed as the bank and rank PUs do.

Storage: one uint8 array per rank touched, shape (rows, banks, chips, page_bytes), grown on demand to the
highest row the allocator handed out, so only rows in use cost host memory.

Write path (`append`): FP16 KV -> host cache lines -> bit-level then head-level re-layout (relayout.py) ->
chip bytes stored at the slots `mapping.slot_of` gives. With the naive map the lines are stored as a
conventional controller would (standard striping, mapping.naive_line_of) and nothing is re-laid out.

Attention (`attend`), per request and layer, for all KV heads at once:
1. Score phase: each bank PU reads its own bank's slots, reinterprets its bytes as FP16 K slices, and
   dot-products each with the matching slice of every query head of its KV head (Q from the shared buffer),
   accumulating in `pim.bank_pu.accumulate`; one partial per (token, query head) lands in its result buffer.
2. Rank PU (FP32): receives the partials at `pim.bank_pu.partial_bytes` precision (2: FP16, 4: FP32),
   sums the N_hc chip partials, applies the scale, and runs softmax per chunk of tokens
   (`chunk_tokens`: what the result buffers hold) with a streaming running max and sum across chunks. The
   chunk's exp(x - chunk max) is kept at `score_dtype`; after the last chunk each is rescaled by
   exp(chunk max - final max) and written to the shared buffer as S (so S <= 1 with its max at 1, which keeps
   FP16 S out of the subnormal range; dividing by the sum is left to the end).
3. Context phase: each bank PU multiplies its tokens' V slices by broadcast S and accumulates an E_h / N_hc
   partial per query head; the rank PU sums partials over banks (FP32), concatenates the chips' element
   slices and divides by the softmax sum.
Slots past the sequence end (the tail of the last stripe) are masked: score -inf, V treated as zero.

With the naive map no bank holds a whole FP16 value, so the operands are reassembled from their two chips on
the rank side and the same computation runs with one partition per head (same math, different data flow).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.lib.stride_tricks import as_strided

from l3.devices.pim import relayout
from l3.devices.pim.allocator import KvAllocator
from l3.devices.pim.mapping import K, KvAddress, KvLayout, Placement, V, naive_line_of, slot_of
from l3.specs.dram import DramSpec
from l3.specs.pim import PimSpec

_DTYPES = {"fp16": np.float16, "fp32": np.float32}
_PARTIAL_DTYPES = {2: np.float16, 4: np.float32}  # bank_pu.partial_bytes -> score partial format


class FunctionalPim:
    """Byte-exact KV storage and PU-faithful decode attention for one model on one DIMM-PIM system."""

    def __init__(
        self,
        dram: DramSpec,
        pim: PimSpec,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        gqa_group: int,
        max_rows: int | None = None,
        score_dtype: Literal["fp16", "fp32"] = "fp16",
        chunk_tokens: int | None = None,
    ):
        """`max_rows` caps rows per bank (allocator capacity); `score_dtype` is the precision of S written
        to the shared buffer; `chunk_tokens` (a multiple of the banks per chip) defaults to what the bank
        result buffers hold: banks * result_buffer_bytes // (partial_bytes * gqa_group) tokens."""
        self.layout = KvLayout.build(dram, pim, n_kv_heads, head_dim, gqa_group)
        self.allocator = KvAllocator(self.layout, n_layers, max_rows)
        self.gqa_group = gqa_group
        self.acc_dtype = _DTYPES[pim.bank_pu.accumulate]
        self.partial_dtype = _PARTIAL_DTYPES[pim.bank_pu.partial_bytes]
        self.score_dtype = _DTYPES[score_dtype]
        banks = self.layout.banks
        if chunk_tokens is None:
            per_bank = pim.bank_pu.result_buffer_bytes // (pim.bank_pu.partial_bytes * gqa_group)
            chunk_tokens = banks * max(1, per_bank)
        if chunk_tokens < 1 or chunk_tokens % banks:
            raise ValueError(f"chunk_tokens must be a positive multiple of {banks} (banks per chip)")
        self.chunk_tokens = chunk_tokens
        self._store: dict[int, np.ndarray] = {}

    # --- storage -----------------------------------------------------------------------------------
    def _rank_store(self, rank: int, rows_needed: int) -> np.ndarray:
        """The rank's (rows, banks, chips, page_bytes) bytes, grown to at least `rows_needed` rows."""
        lay = self.layout
        store = self._store.get(rank)
        have = 0 if store is None else store.shape[0]
        if store is None or rows_needed > have:
            grown = np.zeros(
                (max(rows_needed, have + have // 2), lay.banks, lay.chips, lay.page_bytes), np.uint8
            )
            if store is not None:
                grown[:have] = store
            self._store[rank] = store = grown
        return store

    def _cells(self, placement: Placement) -> np.ndarray:
        """The rank's storage viewed as the units the layout addresses: slots (mapped) or bursts (naive)."""
        lay = self.layout
        store = self._rank_store(placement.rank, int(placement.rows.max(initial=-1)) + 1)
        if lay.mapped:
            shape = (*store.shape[:3], lay.slots_per_row, lay.slice_bytes)
            return as_strided(store, shape, (*store.strides[:3], lay.slice_bytes, 1))
        return store.reshape(*store.shape[:3], lay.page_bytes // lay.burst_bytes, lay.burst_bytes)

    def _index(self, placement: Placement, tokens: np.ndarray) -> tuple[np.ndarray, ...]:
        """Index into `_cells` for `tokens` (any shape) of every round of one K|V list, kv axis first."""
        lay = self.layout
        rounds = np.arange(lay.rounds).reshape(-1, *([1] * tokens.ndim))
        if lay.mapped:
            bank, stripe, slot = slot_of(lay, tokens)
            rows = placement.rows[rounds, :, stripe]  # (rounds, *tokens.shape, 2)
            return np.moveaxis(rows, -1, 0), bank, slice(None), slot
        lines_per_token = lay.block_bytes // lay.line_bytes
        lines = tokens[..., None] * lines_per_token + np.arange(lines_per_token)
        bank, stripe, burst = naive_line_of(lay, lines)
        rows = placement.rows[rounds[..., None], :, stripe]  # (rounds, *tokens.shape, lines, 2)
        return np.moveaxis(rows, -1, 0), bank, slice(None), burst

    def _to_cells(self, host: np.ndarray) -> np.ndarray:
        """Host bytes (..., block_bytes) of one token-round -> what the chips store (write path)."""
        lay = self.layout
        bursts = relayout.to_bursts(lay, host)
        if lay.mapped:  # (..., chips, S)
            return relayout.chip_bytes(lay, relayout.head_relayout(lay, relayout.bit_relayout(lay, bursts)))
        return relayout.chip_bytes(lay, bursts[..., None, :, :])  # per line: (..., lines, chips, burst)

    def _from_cells(self, cells: np.ndarray) -> np.ndarray:
        """Inverse of `_to_cells` (read-back path)."""
        lay = self.layout
        if lay.mapped:
            bursts = relayout.bursts_from_chips(lay, cells)
            return relayout.from_bursts(relayout.bit_restore(lay, relayout.head_restore(lay, bursts)))
        return relayout.from_bursts(relayout.bursts_from_chips(lay, cells)[..., 0, :, :])

    def _host_bytes(self, x: np.ndarray) -> np.ndarray:
        """(T, n_kv_heads, E) -> FP16 bytes (rounds, T, block_bytes); idle groups of the last round zero."""
        lay = self.layout
        if x.ndim != 3 or x.shape[1:] != (lay.n_kv_heads, lay.head_dim):
            raise ValueError(f"KV must be (tokens, {lay.n_kv_heads}, {lay.head_dim}), got {x.shape}")
        padded = np.zeros((x.shape[0], lay.rounds * lay.groups, lay.head_dim), np.float16)
        padded[:, : lay.n_kv_heads] = x
        return padded.reshape(x.shape[0], lay.rounds, lay.groups * lay.head_dim).view(np.uint8).swapaxes(0, 1)

    # --- public API --------------------------------------------------------------------------------
    def append(self, request: int, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        """Store K and V (tokens, n_kv_heads, head_dim), cast to FP16, after the tokens already held.
        Raises PimCapacityError (nothing stored) when the request's rank is full."""
        k_bytes, v_bytes = self._host_bytes(np.asarray(k)), self._host_bytes(np.asarray(v))
        if k_bytes.shape != v_bytes.shape:
            raise ValueError("k and v must have the same shape")
        start = self.allocator.tokens(request, layer)
        placement = self.allocator.reserve(request, layer, k_bytes.shape[1])
        tokens = np.arange(start, start + k_bytes.shape[1])
        kv_rows, *rest = self._index(placement, tokens)
        cells = self._cells(placement)
        for kv, data in ((K, k_bytes), (V, v_bytes)):
            cells[(kv_rows[kv], *rest)] = self._to_cells(data)

    def read_kv(self, request: int, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """K and V (tokens, n_kv_heads, head_dim) FP16 read back through the inverse re-layout."""
        lay = self.layout
        placement = self.allocator.placement(request, layer)
        n = self.allocator.tokens(request, layer)
        kv_rows, *rest = self._index(placement, np.arange(n))
        cells = self._cells(placement)
        out = []
        for kv in (K, V):
            host = self._from_cells(cells[(kv_rows[kv], *rest)])  # (rounds, T, block_bytes)
            heads = host.swapaxes(0, 1).reshape(n, -1).view(np.float16).reshape(n, -1, lay.head_dim)
            out.append(heads[:, : lay.n_kv_heads])
        return out[0], out[1]

    def read_byte(self, address: KvAddress) -> int:
        """The byte stored at one DRAM address (0 where nothing was ever written): checks the address map."""
        store = self._store.get(address.rank)
        if store is None or address.row >= store.shape[0]:
            return 0
        offset = address.column * self.layout.lane_bytes + address.byte
        return int(store[address.row, address.bank, address.chip, offset])

    def free(self, request: int) -> None:
        """Release all of a request's KV (every layer)."""
        self.allocator.free(request)

    def attend(
        self, requests: Sequence[int], layer: int, q: np.ndarray, scale: float | None = None
    ) -> np.ndarray:
        """Decode attention of one layer: q (B, n_heads, head_dim) FP16 -> (B, n_heads, head_dim) FP32.
        Query head i uses KV head i // gqa_group; `scale` defaults to 1 / sqrt(head_dim)."""
        lay = self.layout
        q = np.asarray(q, dtype=np.float16)
        n_heads = lay.n_kv_heads * self.gqa_group
        if q.shape != (len(requests), n_heads, lay.head_dim):
            raise ValueError(f"q must be ({len(requests)}, {n_heads}, {lay.head_dim}), got {q.shape}")
        scale = 1.0 / math.sqrt(lay.head_dim) if scale is None else scale
        out = np.empty(q.shape, np.float32)
        for b, request in enumerate(requests):
            o, _, total = self._attend_one(request, layer, q[b], scale)
            out[b] = o / total[:, None]
        return out

    def attend_partial(self, request: int, layer: int, q: np.ndarray, scale: float | None = None) -> Partial:
        """One rank's share of a token-striped request-layer: decode attention over the tokens stored under
        `request` (one chunk or several on this rank), left unnormalised for an exact merge with the other
        ranks' partials (`merge_partials`). q (n_heads, head_dim) FP16."""
        lay = self.layout
        q = np.asarray(q, dtype=np.float16)
        if q.shape != (lay.n_kv_heads * self.gqa_group, lay.head_dim):
            raise ValueError(f"q must be ({lay.n_kv_heads * self.gqa_group}, {lay.head_dim}), got {q.shape}")
        scale = 1.0 / math.sqrt(lay.head_dim) if scale is None else scale
        return Partial(*self._attend_one(request, layer, q, scale))

    # --- the PUs -----------------------------------------------------------------------------------
    def _operands(self, request: int, layer: int) -> tuple[np.ndarray, np.ndarray, int]:
        """K and V as the PUs hold them: (rounds, G, chip parts, bank parts, slots, elements) FP16, and T.

        Mapped: bank b of chip (g, s) holds slots j of tokens j * N_bk + b, elements of slice s.
        Naive: whole heads reassembled on the rank side, one part per head."""
        lay = self.layout
        n = self.allocator.tokens(request, layer)
        if n == 0:
            raise ValueError(f"request {request} has no tokens in layer {layer}")
        if not lay.mapped:
            pad = ((0, 0), (0, lay.rounds * lay.groups - lay.n_kv_heads), (0, 0))
            k, v = (
                np.pad(x, pad).reshape(n, lay.rounds, lay.groups, 1, 1, -1).transpose(1, 2, 3, 4, 0, 5)
                for x in self.read_kv(request, layer)
            )
            return k, v, n
        placement = self.allocator.placement(request, layer)
        cells = self._cells(placement)
        slots = -(-n // lay.banks)
        banks = np.arange(lay.banks)[:, None]
        kv_rows, bank, _, slot = self._index(placement, np.arange(slots) * lay.banks + banks)
        assert (bank == banks).all()  # every bank PU reads only its own bank
        ops = []
        for kv in (K, V):
            raw = cells[kv_rows[kv], bank, :, slot]  # (rounds, banks, slots, chips, S)
            vals = raw.view(np.float16)[:, :, :, lay.chip_grid()]  # (rounds, banks, slots, G, N_hc, E_c)
            ops.append(vals.transpose(0, 3, 4, 1, 2, 5))
        return ops[0], ops[1], n

    def _attend_one(self, request: int, layer: int, q: np.ndarray, scale: float) -> tuple[np.ndarray, ...]:
        """(unnormalised output (n_heads, E), running max (n_heads,), softmax sum (n_heads,)), FP32."""
        lay = self.layout
        k, v, n = self._operands(request, layer)
        rounds, groups, chip_parts, bank_parts, slots, elems = k.shape
        gqa = self.gqa_group
        # Q slices per (round, group, chip part): (rounds, G, parts, 1, E_c, gqa)
        qh = np.zeros((rounds * groups * gqa, lay.head_dim), np.float16)
        qh[: q.shape[0]] = q
        qh = qh.reshape(rounds, groups, gqa, chip_parts, elems).transpose(0, 1, 3, 4, 2)[:, :, :, None]
        valid = (np.arange(slots) * bank_parts + np.arange(bank_parts)[:, None]) < n  # (bank parts, slots)

        # score phase: bank PUs -> result buffers -> rank PU sums chips
        partial = _bank_dot(k, qh, self.acc_dtype, lay.burst_bytes // 2)  # (r, G, c, b, slots, gqa)
        x = partial.astype(self.partial_dtype).astype(np.float32).sum(axis=2) * np.float32(scale)
        x = np.where(valid[..., None], x, -np.inf).transpose(0, 1, 4, 3, 2).reshape(rounds, groups, gqa, -1)

        # rank PU: chunked softmax with streaming renormalisation
        chunk = self.chunk_tokens
        n_chunks = -(-n // chunk)
        xc = np.full((rounds, groups, gqa, n_chunks * chunk), -np.inf, np.float32)
        xc[..., : x.shape[-1]] = x
        xc = xc.reshape(rounds, groups, gqa, n_chunks, chunk)
        m_c = xc.max(axis=-1)
        p = np.exp(xc - m_c[..., None])
        l_c = p.sum(axis=-1, dtype=np.float32)
        p_held = p.astype(self.score_dtype)
        m = np.full(m_c.shape[:-1], -np.inf, np.float32)
        total = np.zeros_like(m)
        for c in range(n_chunks):
            m_new = np.maximum(m, m_c[..., c])
            total = total * np.exp(m - m_new) + l_c[..., c] * np.exp(m_c[..., c] - m_new)
            m = m_new
        s = (p_held.astype(np.float32) * np.exp(m_c - m[..., None])[..., None]).astype(self.score_dtype)
        s = s.reshape(rounds, groups, gqa, -1)[..., : slots * bank_parts]
        s = s.reshape(rounds, groups, gqa, slots, bank_parts).transpose(0, 1, 4, 2, 3)[:, :, None]

        # context phase: bank PUs accumulate S.V -> rank PU sums banks, joins chip slices, divides by sum
        v = np.where(valid[..., None], v, np.float16(0))
        partial = _bank_axpy(s, v, self.acc_dtype)  # (r, G, c, b, gqa, E_c)
        o = partial.astype(np.float32).sum(axis=3)  # (r, G, c, gqa, E_c)
        o = o.transpose(0, 1, 3, 2, 4).reshape(rounds, groups, gqa, lay.head_dim)
        heads = q.shape[0]
        return o.reshape(-1, lay.head_dim)[:heads], m.reshape(-1)[:heads], total.reshape(-1)[:heads]


@dataclass(frozen=True)
class Partial:
    """One rank's attention over part of a request's tokens, per query head (FP32): `out` = sum_j exp(x_j - max)
    v_j (n_heads, E), `max` = the largest logit x_j, `total` = sum_j exp(x_j - max)."""

    out: np.ndarray
    max: np.ndarray
    total: np.ndarray


def merge_partials(parts: Sequence[Partial]) -> np.ndarray:
    """Exact attention output (n_heads, E) FP32 from the partials of disjoint token sets covering a request:
    each is rescaled to the common max (log-sum-exp) before the sums are added; what the GPU or host does
    with a token-striped request's partials."""
    m = np.max([p.max for p in parts], axis=0)
    scales = [np.exp(p.max - m) for p in parts]
    out = sum(p.out * w[:, None] for p, w in zip(parts, scales, strict=True))
    total = sum(p.total * w for p, w in zip(parts, scales, strict=True))
    return (out / total[:, None]).astype(np.float32)


def _bank_dot(k: np.ndarray, q: np.ndarray, acc: type, per_access: int) -> np.ndarray:
    """Bank-PU adder-tree datapath: k (..., slots, E_c) . q (..., E_c, heads) -> (..., slots, heads) in `acc`.
    FP32: products of FP16 inputs are exact, sums in FP32. FP16: per column access the `per_access` products
    are rounded to FP16 and summed by a pairwise tree, then added to an FP16 accumulator."""
    if acc is np.float32:
        return _matmul32(k, q)
    total = np.float16(0)
    for a in range(0, k.shape[-1], per_access):
        cols = slice(a, a + per_access)
        terms = k[..., cols, None] * q[..., None, cols, :]  # (..., slots, per_access, heads)
        while terms.shape[-2] > 1:
            terms = terms[..., 0::2, :] + terms[..., 1::2, :]
        total = total + terms[..., 0, :].astype(np.float16)
    return total


def _bank_axpy(s: np.ndarray, v: np.ndarray, acc: type) -> np.ndarray:
    """Bank-PU accumulator datapath: s (..., heads, slots) times v (..., slots, E_c) summed over the bank's
    slots in order -> (..., heads, E_c) in `acc` (FP16: each product and each add rounded to FP16)."""
    if acc is np.float32:
        return _matmul32(s, v)
    total = np.float16(0)
    for j in range(v.shape[-2]):
        total = total + (s[..., :, j, None] * v[..., j, None, :]).astype(np.float16)
    return total


def _matmul32(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """FP32 batched matmul on C-contiguous, fully broadcast operands (numpy then hands each to BLAS)."""
    batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a32, b32 = (
        np.ascontiguousarray(np.broadcast_to(x, batch + x.shape[-2:]), dtype=np.float32) for x in (a, b)
    )
    return np.matmul(a32, b32)
