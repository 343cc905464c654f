"""L3+ token-striped KV placement: where tokens lie, what it does to rank balance, and what partials cost."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_workload
from l3.errors import SpecError
from l3.report.summary import summarize
from l3.sched import build_scheduler
from l3.sched.kv import HBM_TIER
from l3.sched.plan import Plan
from l3.sched.requests import RequestTable, Status, WaitingQueue
from l3.sched.timing import decode_bin
from l3.sim.simulator import Simulator
from l3.specs.model import ModelSpec, get_model
from l3.specs.system import ParallelSpec, SystemSpec, get_system, with_overrides
from l3.systems import build_system
from l3.systems.l3 import L3System
from l3.systems.offload import deal

TINY = ModelSpec(name="tiny", n_layers=4, d_model=512, n_heads=4, n_kv_heads=4, head_dim=128, ffn_dim=1024,
                 ffn_kind="gated", vocab_size=1000)  # fmt: skip


def spec(placement="striped", chunk=256, over="rankset", merge="gpu", channels=4, order="rotate"):
    return SystemSpec.build({
        "name": "tiny-l3-plus", "kind": "l3",
        "gpu": {"preset": "a100-80gb", "count": 1},
        "parallelism": {"tiny": {"tp": 1, "dp": 1}},
        "pim": {"org_overrides": {"channels": channels, "rows": 4096}},
        "coordination": {"placement": placement, "chunk_tokens": chunk, "stripe_over": over, "partial_merge": merge,
                         "chunk_order": order},
        "scheduler": {"max_batched_tokens": 256},
    })  # fmt: skip


@functools.cache
def system(kv_heads=4, **kw) -> L3System:
    model = TINY.model_copy(update={"n_kv_heads": kv_heads})
    return L3System(spec(**kw).deploy(model))


@settings(max_examples=30, deadline=None)
@given(tokens=st.lists(st.integers(0, 20_000), min_size=1, max_size=12), chunk=st.sampled_from([16, 256, 1000]),
       over=st.sampled_from(["rankset", "replica"]), kv_heads=st.sampled_from([4, 1]), data=st.data())  # fmt: skip
def test_spread_keeps_every_token_and_balances_each_request(tokens, chunk, over, kv_heads, data):
    """kv_heads 4: each slot's heads split over all 4 channels (one channel group); 1: a slot is one channel."""
    s = system(chunk=chunk, over=over, kv_heads=kv_heads)
    place = np.array(data.draw(st.lists(st.integers(0, s.slots - 1), min_size=len(tokens), max_size=len(tokens))))
    tokens = np.array(tokens)
    req, slot, held = s.spread(place, tokens)
    assert (held > 0).all() and ((slot >= 0) & (slot < s.slots)).all()
    np.testing.assert_array_equal(np.bincount(req, weights=held, minlength=len(tokens)), tokens)
    for i in range(len(tokens)):
        mine = slot[req == i]
        assert len(np.unique(mine)) == len(mine)  # one entry per (request, slot)
        if over == "rankset":  # every chunk in the rankset of the request's offset
            assert (mine % s.ranksets == place[i] % s.ranksets).all()
        domain = s.slots // s.ranksets if over == "rankset" else s.slots  # channel groups (x ranksets)
        full = tokens[i] // chunk
        if full >= domain:  # a long request: every position holds it, within a chunk of each other
            assert len(mine) == domain
            assert np.ptp(held[req == i]) <= chunk


def _decided(rng, s: L3System, place: np.ndarray, tokens: np.ndarray, chunk: int) -> np.ndarray:
    """A decided stripe order per request: its stripe's slots in a random order, a random prefix of the positions
    (up to two beyond those its tokens need: decided ahead of a run of steps) decided, the rest -1."""
    order = np.full((len(place), s.stripe_slots(place[:1]).shape[1]), -1, np.int32)
    for i, row in enumerate(s.stripe_slots(place)):
        need = min(len(row), -(-int(tokens[i]) // chunk) + 2)
        k = rng.integers(0, need + 1)
        order[i, :k] = rng.permutation(row)[:k]
    return order


@settings(max_examples=30, deadline=None)
@given(tokens=st.lists(st.integers(0, 20_000), min_size=1, max_size=12), chunk=st.sampled_from([16, 256, 1000]),
       over=st.sampled_from(["rankset", "replica"]), kv_heads=st.sampled_from([4, 1]),
       seed=st.integers(0, 2**32 - 1))  # fmt: skip
def test_decided_stripe_slots_move_positions_not_tokens(tokens, chunk, over, kv_heads, seed):
    """With some positions' slots decided (least-loaded chunk order), each request's positions hold the same tokens
    as in rotation order; a decided position lies at its decided slot, the later ones on the stripe's other slots
    in rotation order."""
    s = system(chunk=chunk, over=over, kv_heads=kv_heads)
    rng = np.random.default_rng(seed)
    tokens = np.array(tokens)
    place = rng.integers(0, s.slots, len(tokens))
    order = _decided(rng, s, place, tokens, chunk)
    req0, _, held0 = s.spread(place, tokens)
    req, slot, held = s.spread(place, tokens, order)
    np.testing.assert_array_equal(req, req0)
    np.testing.assert_array_equal(held, held0)  # position by position
    rotation = s.stripe_slots(place)
    for i in range(len(tokens)):
        mine = slot[req == i]
        assert len(np.unique(mine)) == len(mine)  # one entry per (request, slot)
        assert set(mine) <= set(rotation[i])  # within the request's stripe
        decided = list(order[i][order[i] >= 0])
        rest = [x for x in rotation[i] if x not in decided]
        np.testing.assert_array_equal(mine, (decided + rest)[: len(mine)])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 8), kv_heads=st.sampled_from([4, 1]),
       over=st.sampled_from(["rankset", "replica"]))  # fmt: skip
def test_each_new_chunk_goes_to_the_least_loaded_slot_of_its_stripe(seed, n, kv_heads, over):
    """`_place_chunks` against a chunk-by-chunk reference: each running request's chunks (at its decided slots, then
    its stripe's others in rotation order; decided ones not yet written too) load their slot with a whole chunk
    each; every position a request newly needs takes, request after request, the least-loaded slot of its stripe
    that it does not hold yet, the earliest in rotation order on a tie."""
    rng = np.random.default_rng(seed)
    chunk = 256
    model = TINY.model_copy(update={"n_kv_heads": kv_heads})
    sp = spec(chunk=chunk, over=over, order="least-loaded")
    s = L3System(sp.deploy(model))
    table = RequestTable(np.zeros(n), rng.integers(1, 40 * chunk, n), np.full(n, 10**6))
    sched = build_scheduler(sp, model, s.topology(), table, WaitingQueue(table))
    assert table.stripe.shape[1] == s.stripe_slots(np.zeros(1, int)).shape[1]
    ids = np.arange(n)
    table.placement[:] = rng.integers(0, s.slots, n)
    table.stripe[:] = _decided(rng, s, table.placement, table.context(ids), chunk)
    sched.running = ids
    stripes = []
    load = np.zeros(s.slots)
    for i in ids:
        decided = [int(x) for x in table.stripe[i] if x >= 0]
        stripes.append(decided + [int(x) for x in s.stripe_slots(table.placement[i : i + 1])[0] if x not in decided])
        for k in range(-(-max(int(table.context(ids)[i]), len(decided) * chunk) // chunk)):
            load[stripes[i][k % len(stripes[i])]] += chunk
    tokens = table.context(ids) + rng.integers(0, 6 * chunk, n)
    want = []
    for i in ids:
        mine = [int(x) for x in table.stripe[i] if x >= 0]
        for _ in range(len(mine), min(len(stripes[i]), -(-int(tokens[i]) // chunk))):
            free = [x for x in s.stripe_slots(table.placement[i : i + 1])[0] if x not in mine]
            mine.append(min(free, key=lambda x: (load[x], free.index(x))))
            load[mine[-1]] += chunk
        want.append(mine)
    sched._place_chunks(ids, tokens)
    for i in ids:
        got = table.stripe[i]
        np.testing.assert_array_equal(got[: len(want[i])], want[i])
        assert (got[len(want[i]) :] == -1).all()


@pytest.mark.parametrize("over", ["rankset", "replica"])
def test_every_chunk_written_has_its_slot_decided(over, monkeypatch):
    """Serving with least-loaded chunk order: every position holding tokens in an executed iteration (each step of
    a run of steps, prefill chunks too) was given its slot by the scheduler beforehand, each request's slots are
    distinct, and every request completes."""
    sp = spec(chunk=256, over=over, order="least-loaded")
    checked = []
    work_split = L3System.pim_layer_work_split

    def check(self, ids, ctx, placement, pre_ids, pre_tokens, pre_place, offsets, pre_prefix=None, order=None,
              pre_order=None):  # fmt: skip
        last = -(-(np.asarray(ctx) + max(offsets)) // 256)
        before = np.zeros(len(pre_ids)) if pre_prefix is None else np.asarray(pre_prefix)
        for rows, need in ((order, last), (pre_order, -(-(before + pre_tokens) // 256))):
            for row, k in zip(rows, np.minimum(need, rows.shape[1]).astype(int), strict=True):
                assert (row[:k] >= 0).all() and len(set(row[:k])) == k
                checked.append(k)
        return work_split(self, ids, ctx, placement, pre_ids, pre_tokens, pre_place, offsets, pre_prefix, order,
                          pre_order)  # fmt: skip

    monkeypatch.setattr(L3System, "pim_layer_work_split", check)
    rng = np.random.default_rng(3)
    wl = make_workload(np.zeros(12), rng.integers(16, 1500, 12), rng.integers(200, 3000, 12), mode="offline")
    res = Simulator(sp.deploy(TINY.model_copy(update={"n_kv_heads": 1})), wl).run()  # a slot is one channel
    assert (res.table.status == Status.DONE).all()
    assert max(checked) > 1 and (res.table.stripe >= 0).sum() > 12  # requests did grow over several slots


def test_one_long_request_keeps_every_rank_of_the_replica_busy():
    """A request of 64 chunks: unstriped, one rank works per layer; striped over the replica, all 16 (4 channels x
    4 ranksets) do, the slowest within a chunk of the mean; over its rankset, the 4 ranks of its layer's rankset."""
    ctx, place = np.array([64 * 256.0]), np.array([0])
    loads = {}
    cases = (("rank", {"placement": "rank"}), ("rankset", {"over": "rankset"}), ("replica", {"over": "replica"}))
    for name, kw in cases:
        s = system(**kw)
        work = s.pim_layer_work(np.array([0]), ctx, place, np.empty(0, int), np.empty(0), np.empty(0, int),
                                np.array([0]))[0]  # (residues, ranks)  # fmt: skip
        loads[name] = work
        busy = (work > 0).sum(axis=1)
        expect = {"rank": 1, "rankset": s.channels, "replica": s.n_ranks}[name]
        assert (busy == expect).all(), name
    rep = loads["replica"]
    assert (rep.max(axis=1) / rep[rep > 0].reshape(rep.shape[0], -1).mean(axis=1) < 1.05).all()
    # striping pays a partial per rank, but the layer ends far sooner than on one rank
    assert loads["replica"].max() < 0.2 * loads["rank"].max()


def test_partials_cross_pcie_or_the_host_merges_them():
    ctx, place, off = np.array([5000.0, 300.0]), np.array([0, 1]), np.array([0, 10])
    gpu, host = (system(merge=m, kv_heads=1).outputs(ctx, place, off) for m in ("gpu", "host"))
    s = system(merge="gpu", kv_heads=1)  # one KV head: a slot is one channel, 4 groups
    parts = len(s.spread(place, ctx)[0])  # 5000 tokens: all 4 groups; 300: 2 chunks
    assert parts == 6
    np.testing.assert_allclose(gpu["down_bytes"], parts * TINY.n_heads * (TINY.head_dim + 2) * 4)
    assert (gpu["merge_gpu_s"] > 0).all() and "merge_host_s" not in gpu
    assert "down_bytes" not in host and (host["merge_host_s"] > 0).all()
    assert system(placement="rankset").outputs(ctx, place, off) == {}  # unstriped: whole outputs, no merge


@pytest.mark.parametrize("over", ["rankset", "replica"])
@pytest.mark.parametrize("merge", ["gpu", "host"])
def test_l3_plus_serves_every_request(over, merge):
    rng = np.random.default_rng(3)
    wl = make_workload(np.zeros(40), rng.integers(16, 400, 40), rng.integers(1, 900, 40), mode="offline")
    res = Simulator(spec(over=over, merge=merge).deploy(TINY), wl).run()
    t = res.table
    assert (t.generated == t.output).all() and not t.reject_reason
    assert res.schedulers[0].kv.used_blocks == 0


# --- one DIMM pool for every DP replica (pim.shared) ---------------------------------------------------------
def shared_spec(shared=True, gpus=2):
    base = spec(over="replica", merge="host").model_dump()
    return SystemSpec.build(base | {"gpu": {"preset": "a100-80gb", "count": gpus},
                                    "parallelism": {"tiny": {"tp": 1, "dp": gpus}},
                                    "pim": base["pim"] | {"shared": shared}})  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(chunks=st.lists(st.integers(1, 2048), max_size=6), n_decode=st.integers(0, 300), groups=st.integers(1, 8))
def test_deal_places_every_request_once_and_levels_the_groups(chunks, n_decode, groups):
    plan = Plan(decode_ids=np.arange(n_decode) + 100, prefill_ids=np.arange(len(chunks)),
                prefill_chunks=np.array(chunks, np.int64), prefill_prefix=np.zeros(len(chunks), np.int64),
                prefill_completes=np.ones(len(chunks), bool), decode_on_device=np.arange(n_decode) % 3 > 0,
                prefill_on_device=np.arange(len(chunks)) % 2 > 0)  # fmt: skip
    parts = [part for part, _, _ in deal(plan, groups)]
    assert len(parts) == groups
    for field in ("decode_ids", "prefill_ids"):
        got = np.sort(np.concatenate([getattr(p, field) for p in parts]))
        np.testing.assert_array_equal(got, np.sort(getattr(plan, field)))
    for p in parts:  # each request keeps where its attention runs
        np.testing.assert_array_equal(p.decode_on_device, (p.decode_ids - 100) % 3 > 0)
        np.testing.assert_array_equal(p.prefill_on_device, p.prefill_ids % 2 > 0)
    assert sum(p.link().decodes for p in parts) == plan.link().decodes
    assert sum(p.link().prefill_kv_tokens for p in parts) == plan.link().prefill_kv_tokens
    tokens = np.array([p.prefill_chunks.sum() + len(p.decode_ids) for p in parts])
    # the decodes fill the lowest groups first: groups differ by at most one token, or by the prefill spread
    # where the decodes cannot fill it
    with_decodes = np.array([len(p.decode_ids) > 0 for p in parts])
    if with_decodes.any():
        assert tokens[with_decodes].max() - tokens.min() <= 1
    assert tokens.max() - tokens.min() <= max(max(chunks, default=0), 1)


def test_a_shared_rank_serves_the_groups_one_after_another():
    """Two decodes on the same ranks, dealt to the two GPU groups: each rank streams both requests' KV in one
    command stream (no faster than its banks' peak over both), and the recorded intervals of a rank never
    overlap."""
    s = L3System(shared_spec().deploy(TINY))
    assert (s.groups, s.replicas, s.channels) == (2, 1, 4)
    ctx, place = np.array([3000.0, 5000.0]), np.array([0, 0])

    def work(ids):
        return s.pim_layer_work(np.arange(len(ids)), ctx[ids], place[ids], np.empty(0, int), np.empty(0),
                                np.empty(0, int), np.array([0]))[0]  # fmt: skip

    both = work([0, 1])
    assert (both > np.maximum(work([0]), work([1]))).all()
    _, slot, held = s.spread(place, ctx)
    tokens = np.bincount(slot, weights=held, minlength=s.slots)[0]  # slot 0's tokens, on each rank of it
    streaming = tokens * s.pim.model.kv_bytes_per_token_layer / (s.pim.peak_attention_bw / s.n_ranks)
    assert both[0, s.ranks_of(np.array(0), 0)].min() >= streaming
    rng = np.random.default_rng(5)
    wl = make_workload(np.zeros(30), rng.integers(16, 300, 30), rng.integers(200, 2000, 30), mode="offline")
    res = Simulator(shared_spec().deploy(TINY), wl, timeline_plans=10**9).run()
    by_rank: dict[str, list] = {}
    for _, _, dev, t0, t1, _ in res.metrics.timeline:
        if "/rank" in dev:
            by_rank.setdefault(dev, []).append((t0, t1))
    assert by_rank
    for spans in by_rank.values():
        spans.sort()
        starts, ends = np.array(spans).T
        assert (starts[1:] >= ends[:-1] - 1e-12).all()


def test_a_shared_pool_is_one_replica_over_all_channels_and_serves_everything():
    rng = np.random.default_rng(4)
    wl = make_workload(np.zeros(60), rng.integers(16, 400, 60), rng.integers(1, 1500, 60), mode="offline")
    split, shared = (Simulator(shared_spec(sh, gpus=4).deploy(TINY), wl) for sh in (False, True))
    assert len(split.schedulers) == 4 and len(shared.schedulers) == 1
    assert shared.system.kv_capacity_tokens == 4 * split.system.kv_capacity_tokens
    assert shared.system.attention_bw == pytest.approx(4 * split.system.attention_bw)
    res = shared.run()
    t = res.table
    assert (t.generated == t.output).all() and not t.reject_reason
    assert res.schedulers[0].kv.used_blocks == 0


def test_shared_pool_rejects_the_hbm_tier():
    base = shared_spec().model_dump()
    with pytest.raises(SpecError, match=r"pim\.shared"):
        SystemSpec.build(base | {"coordination": base["coordination"] | {"asymmetric": True}})


# --- the HBM KV tier ---------------------------------------------------------------------------------------
def test_with_the_pim_unused_l3_plus_runs_gpu_only_iterations():
    """Every request fits the HBM tier, so the PIM gets none: L3+ with its HBM tier then runs exactly the
    iterations GPU-only runs at the same parallelism (same plans, same durations, same finish times)."""
    model, par = get_model("llama-3-8b"), ParallelSpec(tp=4, dp=2)
    rng = np.random.default_rng(1)
    wl = make_workload(np.zeros(20), rng.integers(50, 3000, 20), rng.integers(1, 600, 20), mode="offline")
    plus = with_overrides(get_system("l3-plus"), {"coordination": {"asymmetric": True}}).deploy(model, par)
    a, b = (Simulator(d, wl, bulk=False).run() for d in (plus, get_system("gpu-only").deploy(model, par)))
    assert (a.table.kv_tier == HBM_TIER).all()
    sa, sb = a.metrics.series(), b.metrics.series()
    for r in (0, 1):
        ra, rb = sa[sa[:, 0] == r], sb[sb[:, 0] == r]
        np.testing.assert_array_equal(ra[:, 3:6], rb[:, 3:6])  # steps, batch, tokens of every plan
        np.testing.assert_allclose(ra[:, 2] - ra[:, 1], rb[:, 2] - rb[:, 1], rtol=1e-9)
    np.testing.assert_allclose(a.table.finish_s, b.table.finish_s, rtol=1e-9)
    assert summarize(a)["rank_load_imbalance"] is None  # no layer attended on the PIM


# --- reporting -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("placement", ["rank", "striped"])
def test_summary_reports_idle_ranks_merge_cost_and_tier_occupancy(placement):
    """One long request: on one rank per layer, 15 of the 16 ranks idle, and the one working rank is the slowest
    and the mean working rank at once (idle ranks are not imbalance); striped over the replica, none idle and the
    host merges its partials. KV occupancy is a share of capacity."""
    wl = make_workload([0.0], [16], [64 * 256], mode="offline")
    s = summarize(Simulator(spec(placement=placement, over="replica", merge="host").deploy(TINY), wl).run())
    n_ranks = system(placement=placement, over="replica", merge="host").n_ranks
    if placement == "rank":
        assert s["idle_rank_fraction"] == pytest.approx(1 - 1 / n_ranks)
        assert s["rank_load_imbalance"] == pytest.approx(1.0)
        assert s["partial_merge_s"]["host"] == 0.0
    else:
        assert s["idle_rank_fraction"] < 0.05
        assert s["partial_merge_s"]["host"] > 0.0 and s["partial_merge_s"]["gpu"] == 0.0
    (used,) = s["kv_tiers"]["mean_used_fraction"]
    assert 0.0 < used < 1.0 and s["kv_tiers"]["names"] == ["kv"]


def test_imbalance_by_device_decodes_splits_the_mean_over_the_sub_batch_sizes():
    """As the requests finish, the PIM sub-batch passes through every bin of device decodes: each bin's share of
    the PIM layers and its mean imbalance, weighted together, give back the run's mean imbalance exactly."""
    rng = np.random.default_rng(3)
    wl = make_workload(np.zeros(200), np.full(200, 16), rng.integers(64, 64 * 64, 200), mode="offline")
    s = summarize(Simulator(spec(placement="striped", over="replica", merge="host").deploy(TINY), wl).run())
    bins = s["rank_load_imbalance_by_device_decodes"]
    assert list(bins) == ["1-3", "4-15", "16-63", "64+"]
    assert sum(b["layer_share"] for b in bins.values()) == pytest.approx(1.0)
    assert sum(b["imbalance"] * b["layer_share"] for b in bins.values()) == pytest.approx(s["rank_load_imbalance"])
    assert all(b["imbalance"] >= 1.0 for b in bins.values())


@pytest.mark.parametrize(("n", "lo"), [(1, 1), (3, 1), (4, 4), (15, 4), (16, 16), (63, 16), (64, 64), (10**6, 64)])
def test_decode_bin_is_the_lower_edge_of_its_bin(n, lo):
    assert decode_bin(n) == lo


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 40), st.booleans())
def test_the_busiest_slot_features_of_a_batch_equal_those_of_its_prefixes(seed, n, striped):
    """`_attention_row` of a batch (its own computation) is `_attention_rows`' last row, whose prefixes share one
    spread: the busiest slot's tokens and requests, its prefill tokens written, all decode tokens."""
    rng = np.random.default_rng(seed)
    spec = get_system("l3")
    if striped:
        spec = with_overrides(get_system("l3-plus"), {"coordination": {"asymmetric": False}})
    dep = spec.deploy(get_model("qwen-72b"), "paper")
    topo = build_system(dep).topology()
    table = RequestTable()
    sched = build_scheduler(spec, dep.model, topo, table, WaitingQueue(table))
    ctx = rng.integers(1, 40_000, n).astype(float)
    place = rng.integers(0, topo.slots, n)
    written = rng.integers(0, 3, sched.positions) * rng.integers(0, 5000, sched.positions).astype(float)
    ends = sorted({int(m) for m in rng.integers(1, n + 1, 3)} | {n})
    rows = sched._attention_rows(ctx, place, written, ends)
    np.testing.assert_array_equal(sched._attention_row(ctx, place, written), rows[-1])
    for m, row in zip(ends, rows, strict=True):
        np.testing.assert_array_equal(sched._attention_row(ctx[:m], place[:m], written), row)
