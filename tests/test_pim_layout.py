"""Property tests of the DIMM-PIM KV layout: address map, re-layout transforms, row-stripe allocator."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l3.devices.pim import relayout
from l3.devices.pim.allocator import KvAllocator, PimCapacityError
from l3.devices.pim.mapping import KvLayout, kv_address, kv_addresses
from l3.errors import SpecError
from l3.specs.dram import DramOrg, DramSpec, get_org, get_timing
from l3.specs.pim import BankPuSpec, PimFeatures, PimSpec, RankPuSpec


def small_dram(
    channels: int = 2,
    ranks: int = 2,
    rows: int = 32,
    width: int = 8,
    chips: int = 8,
    timing: str = "ddr4-3200",
) -> DramSpec:
    org = DramOrg(name="test", channels=channels, dimms_per_channel=1, ranks_per_dimm=ranks,
                  chips_per_rank=chips, device_width_bits=width, bank_groups=2, banks_per_group=2, rows=rows,
                  columns=1024 * 8 // width)  # fmt: skip
    return DramSpec(timing=get_timing(timing), org=org)


def layout_for(n_hc: int, heads: int, head_dim: int = 64, mapped: bool = True, **dram) -> KvLayout:
    pim = PimSpec(features=PimFeatures(n_hc=n_hc, kv_mapping=mapped))
    return KvLayout.build(small_dram(**dram), pim, heads, head_dim, gqa_group=1)


# --- address map ----------------------------------------------------------------------------------
@pytest.mark.slow
@settings(max_examples=30, deadline=None)
@given(
    n_hc=st.sampled_from([1, 2, 4, 8]),
    heads=st.sampled_from([1, 3, 4, 8]),
    head_dim=st.sampled_from([32, 64, 128]),
    mapped=st.booleans(),
    lengths=st.lists(st.integers(1, 300), min_size=1, max_size=4),
)
def test_map_is_a_bijection_onto_allocated_stripes(n_hc, heads, head_dim, mapped, lengths):
    lay = layout_for(n_hc, heads, head_dim, mapped, rows=512)
    alloc = KvAllocator(lay, n_layers=2)
    seen: set[tuple[int, ...]] = set()
    total = 0
    for request, n in enumerate(lengths):
        layer = request % 2
        placement = alloc.reserve(request, layer, n)
        h, t, e, kv, half = np.meshgrid(np.arange(heads), np.arange(n), np.arange(head_dim), [0, 1], [0, 1],
                                        indexing="ij")  # fmt: skip
        a = kv_addresses(lay, placement, h, t, e, kv, half)
        in_row = a.column * lay.lane_bytes + a.byte
        assert ((a.chip >= 0) & (a.chip < lay.chips) & (a.bank >= 0) & (a.bank < lay.banks)).all()
        assert ((in_row >= 0) & (in_row < lay.page_bytes) & (a.column % lay.beats == 0)).all()
        assert (a.byte < lay.burst_bytes).all()
        # every byte lies in a stripe owned by this (request, layer, head round, K|V)
        owned = placement.rows[h // lay.groups, kv]
        assert (owned == a.row[..., None]).any(axis=-1).all()
        keys = np.stack([np.full(a.row.shape, a.rank), a.chip, a.bank, a.row, in_row], axis=-1).reshape(-1, 5)
        seen.update(map(tuple, keys.tolist()))
        total += keys.shape[0]
    assert len(seen) == total  # no two bytes share an address


@settings(max_examples=30, deadline=None)
@given(n_hc=st.sampled_from([1, 2, 4, 8]), heads=st.sampled_from([1, 2, 8, 16]), n=st.integers(1, 700))
def test_mapped_layout_puts_each_operand_where_its_pu_is(n_hc, heads, n):
    lay = layout_for(n_hc, heads, 128, rows=512)
    placement = KvAllocator(lay, 1).reserve(5, 0, n)
    h, t, e, kv = np.meshgrid(np.arange(heads), np.arange(n), np.arange(128), [0, 1], indexing="ij")
    lo = kv_addresses(lay, placement, h, t, e, kv, 0)
    hi = kv_addresses(lay, placement, h, t, e, kv, 1)
    # a token's slice sits in bank t mod N_bk, on chip s of the head's group g = h mod G
    assert (lo.bank == t % lay.banks).all()
    assert (lo.chip == (h % lay.groups) * lay.n_hc + e // lay.elems_per_chip).all()
    # both bytes of an FP16 value: same chip, bank, row, burst, adjacent
    for f in ("chip", "bank", "row", "column"):
        assert (getattr(lo, f) == getattr(hi, f)).all()
    assert (hi.byte == lo.byte + 1).all()
    # one bank PU sees a token's whole slice in one row, contiguous
    in_row = lo.column * lay.lane_bytes + lo.byte
    e_local = e % lay.elems_per_chip
    assert (in_row - 2 * e_local == (in_row - 2 * e_local)[..., :1, :]).all()
    if heads % lay.groups == 0:  # heads of one round share the row: one all-bank command serves all groups
        r = lo.row.reshape(lay.rounds, lay.groups, n, 128, 2)
        assert (r == r[:, :1]).all()


def test_naive_map_splits_values_and_heads_over_chips():
    lay = layout_for(8, 8, 128, mapped=False)
    placement = KvAllocator(lay, 1).reserve(0, 0, 64)
    lo = kv_addresses(lay, placement, 0, 3, np.arange(128), 0, 0)
    hi = kv_addresses(lay, placement, 0, 3, np.arange(128), 0, 1)
    assert (lo.chip != hi.chip).all()  # an FP16 value's two bytes on two chips
    assert set(lo.chip.tolist()) == set(range(0, lay.chips, 2))
    assert len(set(lo.bank.tolist())) == 128 * 2 // lay.line_bytes  # one head spans several banks


def test_worked_example_matches_docs():
    """The example in docs/pim-layout.md: GQA-8 on the 2 TB platform, N_hc = 1."""
    dram = DramSpec(timing=get_timing("ddr4-3200"), org=get_org("ddr4-l3-2tb"))
    lay = KvLayout.build(dram, PimSpec(), n_kv_heads=8, head_dim=128, gqa_group=8)
    assert (lay.n_hc, lay.slots_per_row, lay.tokens_per_stripe) == (1, 4, 64)
    alloc = KvAllocator(lay, n_layers=80)
    placement = alloc.reserve(request=5, layer=2, n_tokens=1000)
    assert (placement.channel, placement.rankset, placement.rank) == (0, 3, 3)
    addr = kv_address(lay, placement, head=3, token=1000 - 1, element=37, kv=0)
    # token 999: bank 999 % 16 = 7, slot 62 -> stripe 15, slot 2 in row; element 37 -> byte 2*256 + 74
    assert addr == (3, 0, 3, 3, 7, int(placement.rows[0, 0, 15]), 584, 2)


# --- re-layout --------------------------------------------------------------------------------------
LAYOUTS = [
    layout_for(1, 8, 128),
    layout_for(2, 8, 128),
    layout_for(8, 8, 64),
    layout_for(1, 4, 128, chips=4, timing="ddr5-4800"),  # DDR5: 4 x8 chips, BL16
    layout_for(2, 4, 128, width=16, chips=4),  # x16 lanes
]


@pytest.mark.parametrize("lay", LAYOUTS, ids=lambda x: f"c{x.chips}x{8 * x.lane_bytes}b{x.beats}n{x.n_hc}")
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_relayout_transforms_invert_and_deliver_whole_slices(lay, data):
    n_tokens = data.draw(st.integers(1, 5))
    seed = data.draw(st.integers(0, 2**32 - 1))
    host = np.random.default_rng(seed).integers(0, 256, (n_tokens, lay.block_bytes), dtype=np.uint8)
    bursts = relayout.to_bursts(lay, host)
    assert np.array_equal(relayout.from_bursts(bursts), host)
    bit = relayout.bit_relayout(lay, bursts)
    head = relayout.head_relayout(lay, bit)
    assert np.array_equal(relayout.bit_restore(lay, bit), bursts)
    assert np.array_equal(relayout.head_restore(lay, head), bit)
    assert np.array_equal(relayout.bursts_from_chips(lay, relayout.chip_bytes(lay, head)), head)
    # standard striping: chip c sees lane c of every beat -> an FP16 value's bytes on two chips
    lines = host.reshape(n_tokens, -1, lay.beats, lay.chips, lay.lane_bytes)
    std = relayout.chip_bytes(lay, bursts).reshape(n_tokens, lay.chips, -1, lay.beats, lay.lane_bytes)
    assert np.array_equal(std, lines.transpose(0, 3, 1, 2, 4))
    # bit-level: chip c gets line bytes [c * burst, (c + 1) * burst) of each line
    per_line = relayout.chip_bytes(lay, bit).reshape(n_tokens, lay.chips, -1, lay.burst_bytes)
    assert np.array_equal(per_line, host.reshape(n_tokens, -1, lay.chips, lay.burst_bytes).swapaxes(1, 2))
    # head-level: chip c gets block bytes [c * S, (c + 1) * S)
    assert np.array_equal(relayout.chip_bytes(lay, head), host.reshape(n_tokens, lay.chips, lay.slice_bytes))


def test_relayout_cost():
    lay = layout_for(1, 8, 128)
    assert relayout.relayout_sram_needed(lay) == 2 * 8 * 256
    assert relayout.relayout_cost(lay, PimSpec(), 10_000) == relayout.RelayoutCost(0, 0, 4096)
    host = PimSpec(features=PimFeatures(inflight_relayout=False))
    assert relayout.relayout_cost(lay, host, 10_000) == relayout.RelayoutCost(10_000, 10_000, 0)
    with pytest.raises(SpecError, match="relayout_sram_bytes"):
        relayout.relayout_cost(lay, PimSpec(rank_pu=RankPuSpec(relayout_sram_bytes=2048)), 1)
    naive = layout_for(1, 8, 128, mapped=False)
    assert relayout.relayout_cost(naive, PimSpec(), 10_000) == relayout.RelayoutCost(0, 0, 0)


def test_layout_rejects_impossible_shapes():
    with pytest.raises(SpecError, match="bursts"):
        layout_for(8, 8, head_dim=80)  # 10 elements = 20 B per chip: not whole 8-B bursts
    with pytest.raises(SpecError, match="x8 or x16"):
        KvLayout.build(small_dram(width=4), PimSpec(bank_pu=BankPuSpec()), 8, 128, 1)


# --- allocator ----------------------------------------------------------------------------------------
def _snapshot(alloc: KvAllocator) -> tuple:
    entries = {
        key: (e.tokens, e.placement.rank, e.placement.rows.tobytes()) for key, e in alloc._entries.items()
    }
    return alloc.used_stripes().tolist(), alloc.free_stripes().tolist(), dict(alloc._channel), entries


@settings(max_examples=60, deadline=None)
@given(
    n_hc=st.sampled_from([1, 8]),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["reserve", "reserve", "reserve", "free"]),
            st.integers(0, 5),
            st.integers(0, 3),
            st.integers(0, 400),
        ),
        max_size=40,
    ),
)
def test_allocator_never_overcommits(n_hc, ops):
    lay = layout_for(n_hc, 4, 128, rows=16)
    alloc = KvAllocator(lay, n_layers=4)
    n_ranks = lay.channels * lay.ranks_per_channel
    for op, request, layer, n in ops:
        if op == "free":
            alloc.free(request)
        else:
            before = _snapshot(alloc)
            fresh = alloc.channel_of(request) is None
            least_used = int(np.argmin(alloc.used_stripes().reshape(lay.channels, -1).sum(axis=1)))
            if alloc.try_reserve(request, layer, n):
                if fresh:
                    assert alloc.channel_of(request) == least_used
            else:
                assert _snapshot(alloc) == before
                with pytest.raises(PimCapacityError):
                    alloc.reserve(request, layer, n)
                assert _snapshot(alloc) == before
        used, free = alloc.used_stripes(), alloc.free_stripes()
        assert (used + free == 16).all() and (used >= 0).all()
        owners: dict[tuple[int, int], tuple] = {}
        for (req, lyr), entry in alloc._entries.items():
            p = entry.placement
            assert (
                p.rank == alloc.channel_of(req) * lay.ranks_per_channel + (lyr + req) % lay.ranks_per_channel
            )
            assert p.rows.shape == (lay.rounds, 2, lay.stripes_for(entry.tokens))  # <= 1 partial stripe each
            for row in p.rows.ravel().tolist():
                assert 0 <= row < 16
                assert owners.setdefault((p.rank, row), (req, lyr)) == (req, lyr)
        assert sum(used) == len(owners) or n_ranks == 0
    for request in range(6):
        alloc.free(request)
    assert (alloc.free_stripes() == 16).all()
    assert alloc.try_reserve(0, 0, lay.tokens_per_stripe * (16 // (2 * lay.rounds)))  # whole rank reusable


def test_allocator_handles_the_2tb_platform_lazily():
    dram = DramSpec(timing=get_timing("ddr4-3200"), org=get_org("ddr4-l3-2tb"))
    lay = KvLayout.build(dram, PimSpec(), n_kv_heads=8, head_dim=128, gqa_group=1)
    alloc = KvAllocator(lay, n_layers=64)
    assert alloc.free_stripes().sum() == 64 * 262144
    assert alloc.free_stripes().sum() * lay.stripe_bytes == dram.org.capacity_bytes
    for request in range(32):
        for layer in range(64):
            alloc.reserve(request, layer, 10_000)
    assert sorted({alloc.channel_of(r) for r in range(32)}) == list(range(16))  # balanced over channels
    per_layer = lay.stripes_per_layer(10_000)
    assert alloc.used_stripes().sum() == 32 * 64 * per_layer
    assert alloc.free(3) == 64 * per_layer
