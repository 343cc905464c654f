"""Bit-level and head-level KV re-layout as byte transforms on the rank bus, with their inverses and costs.

A host write is a burst of `beats` bus beats; beat b carries bytes [b * bus_bytes, (b + 1) * bus_bytes) of
the 64-byte cache line and byte lane c of the beat goes to chip c (standard striping). Burst arrays below
have shape (..., n, beats, bus_bytes): n bursts as they appear on the bus, lane c of each beat = chip c.

- Bit-level (per burst): the rank PU permutes the line's bytes over the beats so chip c receives line bytes
  [c * burst_bytes, (c + 1) * burst_bytes): whole FP16 values instead of one byte of each of four values.
- Head-level (over n bursts): the rank PU stages n bursts (one token of one head round, chips * S bytes, S =
  the head slice per chip) in SRAM and re-packs them so chip c receives block bytes [c * S, (c + 1) * S):
  the contiguous slice of elements its bank PUs need. Emitting the first output burst needs the block's last
  input burst, so a stream needs two blocks of SRAM (fill one while draining the other): 2 * chips * S bytes,
  4 KiB for GQA-8 with N_hc = 1 and head dim 128.

Both are a transpose of a (chips, m) grid of units into (m, chips): units of one lane (bit-level, m = beats)
or of one chip burst (head-level, m = n). The read-back path applies the inverses in reverse order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from l3.devices.pim.mapping import KvLayout
from l3.errors import SpecError
from l3.specs.pim import PimSpec


def to_bursts(layout: KvLayout, data: np.ndarray) -> np.ndarray:
    """Host bytes (..., n * line_bytes) as the host writes them: (..., n, beats, bus_bytes)."""
    return data.reshape(*data.shape[:-1], data.shape[-1] // layout.line_bytes, layout.beats, layout.bus_bytes)


def from_bursts(bursts: np.ndarray) -> np.ndarray:
    """Inverse of `to_bursts`: (..., n, beats, bus_bytes) -> (..., n * line_bytes)."""
    return bursts.reshape(*bursts.shape[:-3], bursts.shape[-3] * bursts.shape[-2] * bursts.shape[-1])


def _transpose(x: np.ndarray, outer: int, inner: int, lane: int) -> np.ndarray:
    """View the last two axes of x (one burst's bytes) as (outer, inner, lane) units and swap outer and inner:
    (..., a, b) with a * b = outer * inner * lane -> (..., inner, outer * lane)."""
    lead = x.shape[:-2]
    u = x.reshape(*lead, outer, inner, lane).swapaxes(-3, -2)
    return u.reshape(*lead, inner, outer * lane)


def _pieces(layout: KvLayout, bursts: np.ndarray) -> np.ndarray:
    """(..., n, beats, bus) -> (..., n, chips, burst_bytes): the bytes chip c receives in burst k."""
    return _transpose(bursts, layout.beats, layout.chips, layout.lane_bytes)


def _from_pieces(layout: KvLayout, pieces: np.ndarray) -> np.ndarray:
    """Inverse of `_pieces`."""
    return _transpose(pieces, layout.chips, layout.beats, layout.lane_bytes)


def chip_bytes(layout: KvLayout, bursts: np.ndarray) -> np.ndarray:
    """What each chip stores from n consecutive bursts written to consecutive columns:
    (..., n, beats, bus) -> (..., chips, n * burst_bytes)."""
    p = _pieces(layout, bursts).swapaxes(-3, -2)
    return p.reshape(*p.shape[:-2], p.shape[-2] * layout.burst_bytes)


def bursts_from_chips(layout: KvLayout, chips: np.ndarray) -> np.ndarray:
    """Inverse of `chip_bytes`: (..., chips, n * burst_bytes) -> (..., n, beats, bus)."""
    p = chips.reshape(*chips.shape[:-1], chips.shape[-1] // layout.burst_bytes, layout.burst_bytes)
    p = p.swapaxes(-3, -2)
    return _from_pieces(layout, p)


def bit_relayout(layout: KvLayout, bursts: np.ndarray) -> np.ndarray:
    """Per burst: lane c of beat b <- line lane-unit c * beats + b, so chip c gets whole values. (The burst's
    bytes read chip-major are exactly `_from_pieces`'s input.)"""
    return _from_pieces(layout, bursts)


def bit_restore(layout: KvLayout, bursts: np.ndarray) -> np.ndarray:
    """Inverse of `bit_relayout` (read-back path)."""
    return _pieces(layout, bursts).reshape(bursts.shape)


def head_relayout(layout: KvLayout, bursts: np.ndarray) -> np.ndarray:
    """On bit-re-laid bursts (..., n, beats, bus) forming one staging block: chip c's piece of output
    burst k <- block piece c * n + k, so chip c receives block bytes [c * S, (c + 1) * S), S = n * burst."""
    p = _pieces(layout, bursts)  # piece (k, c) = block piece k * chips + c
    n = p.shape[-3]
    flat = p.reshape(*p.shape[:-3], layout.chips, n, layout.burst_bytes)
    return _from_pieces(layout, flat.swapaxes(-3, -2))


def head_restore(layout: KvLayout, bursts: np.ndarray) -> np.ndarray:
    """Inverse of `head_relayout` (read-back path)."""
    p = _pieces(layout, bursts).swapaxes(-3, -2)  # (..., chips, n, burst_bytes) = block piece order
    n = p.shape[-2]
    return _from_pieces(layout, p.reshape(*p.shape[:-3], n, layout.chips, layout.burst_bytes))


def relayout_sram_needed(layout: KvLayout) -> int:
    """Rank-PU SRAM for in-flight re-layout that never stalls the write stream: two staging blocks, bytes."""
    return 2 * layout.block_bytes


@dataclass(frozen=True)
class RelayoutCost:
    """Extra memory-bus traffic a KV write needs for re-layout, bytes (the timing model makes it time)."""

    extra_read_bytes: int
    extra_write_bytes: int
    sram_bytes: int  # rank-PU SRAM the in-flight path uses (0 on the host path or with no re-layout)


def relayout_cost(layout: KvLayout, pim: PimSpec, kv_bytes: int) -> RelayoutCost:
    """Cost of re-laying out `kv_bytes` of freshly written KV.

    In-flight (features.inflight_relayout): the rank PU permutes bytes while they stream in, double-buffered,
    so the write costs no extra bus time provided rank_pu.relayout_sram_bytes >= `relayout_sram_needed`
    (otherwise SpecError). Host path: the KV first lands in standard layout, then the CPU reads it back and
    rewrites it pre-permuted: one extra read and one extra write of the same bytes. With the naive mapping
    (features.kv_mapping off) nothing is re-laid out.
    """
    if not layout.mapped:
        return RelayoutCost(0, 0, 0)
    if not pim.features.inflight_relayout:
        return RelayoutCost(kv_bytes, kv_bytes, 0)
    need = relayout_sram_needed(layout)
    if pim.rank_pu.relayout_sram_bytes < need:
        raise SpecError(
            f"rank_pu.relayout_sram_bytes ({pim.rank_pu.relayout_sram_bytes}) must hold two head-level "
            f"staging blocks of {layout.block_bytes} B (chips x 2 x head_dim / N_hc) = {need} B"
        )
    return RelayoutCost(0, 0, need)
