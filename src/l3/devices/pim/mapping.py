"""KV-cache address map of the DIMM-PIM device: where every byte of every K and V element lives.

Placement (see docs/pim-layout.md for a worked example):

- Request i's layer l lives in rankset (l + i) mod R, in the rank at channel position p_i picked by the
  allocator; one (request, layer) is wholly inside one rank.
- Chips of a rank form G = chips_per_rank / N_hc chip groups. KV head h is served by group g = h mod G;
  chip s of the group holds head elements [s * E_c, (s + 1) * E_c) with E_c = E_h / N_hc, whole FP16 values.
- The G heads with the same *round* q = h // G run side by side on the G groups, so they share row stripes:
  a row stripe is one row index in every bank of every chip of the rank (one all-bank PIM command at one
  row/column drives all chips, so every chip must hold data for the same token there).
- Token t goes to bank t mod N_bk, slot j = t // N_bk of that bank. Slots hold E_c values (S = 2 * E_c bytes)
  and are packed into rows, P // S per row (P = page bytes): slot j is in stripe j // spr at byte
  (j mod spr) * S. K and V of a (request, layer, round) own separate stripe lists.

Addresses name DRAM coordinates: `column` is the column address of the burst holding the byte (a multiple of
the burst length), `byte` the offset inside that chip's burst (0 .. burst_bytes_per_chip - 1), so the byte's
offset inside the row is column * device_width / 8 + byte.

With `features.kv_mapping` off the *naive* map applies (the ablation): the (request, layer, round, K|V)
region is treated as one contiguous token-major buffer, as a conventional memory controller would store it:
consecutive cache lines go to consecutive banks, then consecutive burst columns, then the next stripe, and
inside a cache line each bus beat is striped over the chips (byte i of a beat on chip i / lane_bytes). An FP16
value's two bytes then sit on two chips and one head's elements are spread over all chips and several banks.
The naive map keeps L3's rank placement and stripe allocation, so capacity is identical and the ablation only
changes where bytes sit inside the allocated space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from l3.devices.pim.geometry import PimGeometry
from l3.errors import SpecError
from l3.specs.dram import DramSpec
from l3.specs.pim import PimSpec

K, V = 0, 1  # index of the K / V stripe list in a Placement
FP16_BYTES = 2


@dataclass(frozen=True)
class KvLayout:
    """Layout constants of one model's KV on one DIMM-PIM organisation. Sizes in bytes unless named."""

    chips: int  # chips per rank
    banks: int  # N_bk: banks per chip
    rows: int  # rows per bank
    page_bytes: int  # row size of one chip
    lane_bytes: int  # bytes one chip drives per bus beat (device width / 8)
    beats: int  # bus beats per burst
    channels: int
    ranks_per_channel: int  # R: ranksets
    n_kv_heads: int
    head_dim: int  # E_h, elements
    n_hc: int  # chips per head
    mapped: bool  # True: L3 KV mapping; False: naive controller layout (ablation)

    @classmethod
    def build(cls, dram: DramSpec, pim: PimSpec, n_kv_heads: int, head_dim: int, gqa_group: int) -> KvLayout:
        """Layout for a model on `dram`; N_hc from the bubble-free condition (or the override)."""
        org = dram.org
        if org.device_width_bits not in (8, 16):
            raise SpecError(f"KV layout needs byte-wide chip lanes (x8 or x16), got x{org.device_width_bits}")
        n_hc = PimGeometry(dram, pim).n_hc(head_dim, gqa_group)
        layout = cls(
            chips=org.chips_per_rank, banks=org.banks_per_chip, rows=org.rows, page_bytes=org.page_bytes,
            lane_bytes=org.device_width_bits // 8, beats=2 * dram.timing.burst_cycles, channels=org.channels,
            ranks_per_channel=org.ranks_per_channel, n_kv_heads=n_kv_heads, head_dim=head_dim, n_hc=n_hc,
            mapped=pim.features.kv_mapping,
        )  # fmt: skip
        if head_dim % n_hc or layout.slice_bytes % layout.burst_bytes:
            raise SpecError(
                f"head_dim {head_dim} over N_hc={n_hc} chips gives {layout.slice_bytes} B per chip; "
                f"it must be a whole number of {layout.burst_bytes}-B chip bursts"
            )
        if layout.slice_bytes > layout.page_bytes:
            raise SpecError(f"one head slice ({layout.slice_bytes} B) exceeds a {layout.page_bytes}-B row")
        return layout

    # --- derived sizes -----------------------------------------------------------------------------
    @property
    def groups(self) -> int:
        """G: chip groups per rank = KV heads processed side by side."""
        return self.chips // self.n_hc

    @property
    def rounds(self) -> int:
        """Head rounds: sets of G heads sharing row stripes (the last may leave groups idle)."""
        return math.ceil(self.n_kv_heads / self.groups)

    @property
    def elems_per_chip(self) -> int:
        """E_c: elements of one head held by one chip."""
        return self.head_dim // self.n_hc

    @property
    def slice_bytes(self) -> int:
        """S: bytes of one token's head slice in one chip (one slot)."""
        return FP16_BYTES * self.elems_per_chip

    @property
    def slots_per_row(self) -> int:
        return self.page_bytes // self.slice_bytes

    @property
    def tokens_per_stripe(self) -> int:
        """Tokens one row stripe holds for one (request, layer, round, K|V)."""
        return self.banks * self.slots_per_row

    @property
    def burst_bytes(self) -> int:
        """Bytes one chip delivers per burst (8 for DDR4 x8 BL8)."""
        return self.lane_bytes * self.beats

    @property
    def bus_bytes(self) -> int:
        """Bytes per beat on the rank bus (8 for a 64-bit DDR4 rank)."""
        return self.lane_bytes * self.chips

    @property
    def line_bytes(self) -> int:
        """Bytes of one rank burst = one host cache line (64 for DDR4)."""
        return self.bus_bytes * self.beats

    @property
    def block_bytes(self) -> int:
        """Bytes of one token of one round (all G heads): chips * S; the head-level re-layout unit."""
        return self.chips * self.slice_bytes

    @property
    def stripe_bytes(self) -> int:
        """Bytes of one row stripe (one row in every bank of every chip of a rank)."""
        return self.chips * self.banks * self.page_bytes

    def stripes_for(self, tokens: int) -> int:
        """Row stripes one (request, layer, round, K|V) needs for `tokens` tokens."""
        return -(-tokens // self.tokens_per_stripe)

    def stripes_per_layer(self, tokens: int) -> int:
        """Row stripes one (request, layer) needs for `tokens` tokens: all rounds, K and V."""
        return 2 * self.rounds * self.stripes_for(tokens)

    def head_of(self, round_: int, group: int) -> int:
        """KV head served by chip group `group` in head round `round_` (may be >= n_kv_heads: idle)."""
        return round_ * self.groups + group

    def chip_grid(self) -> np.ndarray:
        """(G, N_hc) chip numbers: row g lists the chips of group g, in head-slice order s."""
        return np.arange(self.chips).reshape(self.groups, self.n_hc)


@dataclass(frozen=True)
class Placement:
    """Where one (request, layer) lives: its rank and, per head round and K|V, its row stripes."""

    channel: int
    rankset: int
    rank: int  # global rank index = channel * ranks_per_channel + rankset
    rows: np.ndarray  # int64 (rounds, 2, n_stripes): row index of each stripe, [:, K] and [:, V]


class KvAddress(NamedTuple):
    """DRAM location of one byte of the KV cache."""

    rankset: int
    channel: int
    rank: int  # global rank index
    chip: int  # chip within the rank
    bank: int  # bank within the chip (bank group = bank // banks_per_group)
    row: int
    column: int  # column address of the burst (multiple of the burst length)
    byte: int  # byte inside this chip's burst


@dataclass(frozen=True)
class KvAddresses:
    """Vectorised KvAddress: integer arrays of one common shape (rank fields are scalars)."""

    rankset: int
    channel: int
    rank: int
    chip: np.ndarray
    bank: np.ndarray
    row: np.ndarray
    column: np.ndarray
    byte: np.ndarray


def rank_of(layout: KvLayout, request: int, layer: int, channel: int) -> tuple[int, int]:
    """(rankset, global rank) of a (request, layer) whose request sits at channel position `channel`."""
    rankset = (layer + request) % layout.ranks_per_channel
    return rankset, channel * layout.ranks_per_channel + rankset


def slot_of(layout: KvLayout, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mapped layout: (bank, stripe index, slot in row) of each token: bank t mod N_bk, slot t // N_bk."""
    slot, bank = np.divmod(np.asarray(tokens, dtype=np.int64), layout.banks)
    stripe, in_row = np.divmod(slot, layout.slots_per_row)
    return bank, stripe, in_row


def naive_line_of(layout: KvLayout, lines: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Naive layout: (bank, stripe index, burst in row) of cache line `lines` of a token-major buffer:
    consecutive lines over banks, then burst columns, then stripes."""
    lines_per_stripe = layout.tokens_per_stripe * layout.block_bytes // layout.line_bytes
    stripe, within = np.divmod(np.asarray(lines, dtype=np.int64), lines_per_stripe)
    burst, bank = np.divmod(within, layout.banks)
    return bank, stripe, burst


def kv_addresses(
    layout: KvLayout,
    placement: Placement,
    head: np.ndarray | int,
    token: np.ndarray | int,
    element: np.ndarray | int,
    kv: np.ndarray | int,
    half: np.ndarray | int = 0,
) -> KvAddresses:
    """Addresses of byte `half` (0 = low, 1 = high; little-endian) of FP16 element `element` of KV head
    `head` of token `token` (K if kv == K else V). Arguments broadcast against each other."""
    head, token, element, kv, half = np.broadcast_arrays(
        *(np.asarray(a, dtype=np.int64) for a in (head, token, element, kv, half))
    )
    round_, group = np.divmod(head, layout.groups)
    if layout.mapped:
        bank, stripe, slot = slot_of(layout, token)
        s, e_local = np.divmod(element, layout.elems_per_chip)
        chip = group * layout.n_hc + s
        in_row = slot * layout.slice_bytes + FP16_BYTES * e_local + half
    else:
        offset = token * layout.block_bytes + (group * layout.head_dim + element) * FP16_BYTES + half
        line, in_line = np.divmod(offset, layout.line_bytes)
        beat, lane_pos = np.divmod(in_line, layout.bus_bytes)
        chip, lane_byte = np.divmod(lane_pos, layout.lane_bytes)
        bank, stripe, burst_in_row = naive_line_of(layout, line)
        in_row = burst_in_row * layout.burst_bytes + beat * layout.lane_bytes + lane_byte
    row = placement.rows[round_, kv, stripe]
    burst, byte = np.divmod(in_row, layout.burst_bytes)
    return KvAddresses(
        rankset=placement.rankset, channel=placement.channel, rank=placement.rank, chip=chip, bank=bank,
        row=row, column=burst * layout.beats, byte=byte,
    )  # fmt: skip


def kv_address(
    layout: KvLayout, placement: Placement, head: int, token: int, element: int, kv: int, half: int = 0
) -> KvAddress:
    """Scalar form of `kv_addresses`."""
    a = kv_addresses(layout, placement, head, token, element, kv, half)
    return KvAddress(a.rankset, a.channel, a.rank, int(a.chip), int(a.bank), int(a.row), int(a.column),
                     int(a.byte))  # fmt: skip
