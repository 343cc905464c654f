"""NEO-style asymmetric pipelining: two KV tiers (GPU HBM, the attention device), attention where the KV is."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_workload
from l3.errors import SpecError
from l3.sched.kv import HBM_TIER, KvPool
from l3.sched.plan import Plan
from l3.sched.requests import RequestTable
from l3.sim.simulator import Simulator
from l3.specs.model import get_model
from l3.specs.system import ParallelSpec, get_system, with_overrides
from l3.systems import build_system

MODEL = get_model("llama-3-8b")


def offload_system(hbm_reserve: float = 0.88, system: str = "cpu-offload", **coord):
    """cpu-offload (or another system, asymmetric) with most HBM reserved, so the HBM tier holds a few requests
    and the rest go to the device."""
    spec = with_overrides(get_system(system), {"gpu": {"memory_reserve_fraction": hbm_reserve},
                                               "coordination": coord | {"asymmetric": True}})  # fmt: skip
    return spec.deploy(MODEL, ParallelSpec(tp=4, dp=2))  # the smallest TP whose weights leave half the HBM free


def test_tiered_pool_keeps_each_tier_within_capacity():
    kv = KvPool([32, 64], block_size=16)
    assert (kv.tiers, kv.capacity_blocks) == (2, 6)
    kv.allocate(2, tier=0)
    with pytest.raises(RuntimeError, match="tier 0"):
        kv.allocate(1, tier=0)
    kv.allocate(4, tier=1)
    kv.free(2, tier=0)
    assert kv.free_in(0) == 2 and kv.free_in(1) == 0
    # Two requests holding 16 tokens each, one per tier: tier 1 has no room for a 17th token, tier 0 has.
    kv2 = KvPool([64, 32], block_size=16)
    kv2.allocate(1, 0)
    kv2.allocate(1, 1)
    assert kv2.growth_steps(np.array([16, 16]), np.array([0, 1]), 100) == 16  # tier 1: one more block of 16


def test_capacity_is_hbm_tier_plus_device_tier():
    dep = offload_system()
    s = build_system(dep)
    assert s.kv_tiers == (dep.hbm_kv_tokens, int(2 * 2**40 // dep.dp // MODEL.kv_bytes_per_token))
    assert s.kv_capacity_tokens == sum(s.kv_tiers)


def test_hbm_tier_attends_on_the_gpu_and_device_tier_on_the_device():
    dep = offload_system()
    s = build_system(dep)
    table = RequestTable(np.zeros(2), np.array([3000, 3000]), np.array([100, 100]))
    table.generated[:] = 1
    table.kv_tier[:] = [0, 1]
    both = Plan(decode_ids=np.array([0, 1]), decode_sub=np.array([0, 1], np.int8),
                decode_on_device=np.array([False, True]))  # as the scheduler places them: by their tier
    t = s.run(both, table, steps=1)
    ctx = 3001.0
    gpu_attn = s.gpu.decode_attention(1, ctx)
    dev_attn = s.device.read_seconds(np.array([[ctx]]))[0]
    L = MODEL.n_layers
    assert t.sub_mem_s[0, 0] == 0.0  # sub-batch 0 attends on the GPU
    assert t.sub_mem_s[0, 1] == pytest.approx(L * dev_attn)
    only_gpu = s.run(Plan(decode_ids=np.array([0])), table, steps=1)
    assert only_gpu.busy["pcie_up"][0] == 0.0 and only_gpu.busy["attn"][0] == 0.0  # nothing leaves the GPU
    no_attn = s._gpu_parts(1, 0, 0, 0.0, 0.0, 1)
    expect = L * (no_attn["pre"] + no_attn["post"] + gpu_attn) + no_attn["head"]
    assert only_gpu.durations[0] == pytest.approx(expect)


def test_asymmetric_needs_kv_off_the_gpus():
    with pytest.raises(SpecError, match="asymmetric"):
        with_overrides(get_system("hbm-pim"), {"coordination": {"asymmetric": True}})


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(5, 30), seed=st.integers(0, 10_000), policy=st.sampled_from(["alignment", "fill-capacity"]),
       system=st.sampled_from(["cpu-offload", "l3-plus"]), warmup=st.sampled_from([2, 16]))  # fmt: skip
def test_every_request_completes_and_tiers_stay_within_capacity(n, seed, policy, system, warmup):
    rng = np.random.default_rng(seed)
    wl = make_workload(np.zeros(n), rng.integers(50, 4000, n), rng.integers(1, 3000, n), mode="offline")
    sim = Simulator(offload_system(policy=policy, system=system, warmup_iterations=warmup), wl)
    peak = np.zeros(2, np.int64)
    for sched in sim.schedulers:
        pool, alloc = sched.kv, sched.kv.allocate

        def checked(n_blocks, tier=0, pool=pool, alloc=alloc):
            alloc(n_blocks, tier)
            assert np.all(pool.tier_used <= pool.tier_capacity)
            peak[:] = np.maximum(peak, pool.tier_used)

        pool.allocate = checked
    res = sim.run()
    assert np.all(res.table.status == 3)  # nothing rejected: the device tier holds any of these requests
    assert all(s.kv.used_blocks == 0 for s in sim.schedulers)
    assert peak[0] > 0  # the HBM tier was used


def test_requests_outgrowing_hbm_move_to_the_device():
    """A request admitted to HBM whose KV outgrows it is preempted and re-admitted to the device tier."""
    dep = offload_system(hbm_reserve=0.895)
    cap = build_system(dep).kv_tiers[0]
    wl = make_workload([0.0], [100], [cap + 500], mode="offline")
    res = Simulator(dep, wl).run()
    assert res.table.status[0] == 3
    assert res.table.preemptions[0] == 1 and res.table.kv_tier[0] == 1


def test_alignment_holds_requests_back_from_an_overloaded_cpu():
    """Once the predictors are trained, a request is kept waiting (not offloaded) when the predicted CPU
    attention time would exceed sub-batch 0's GPU time, even though DRAM has room; all still complete."""
    n = 60  # 12K-token prompts: the HBM tier (192K tokens per replica) holds about 15 of a replica's 30
    wl = make_workload(np.zeros(n), np.full(n, 12000), np.full(n, 300), mode="offline")
    sim = Simulator(offload_system(warmup_iterations=2), wl)
    held = []
    for sched in sim.schedulers:
        choose = sched.choose_tier

        def recording(rid, sched=sched, choose=choose):
            tier = choose(rid)
            if tier is None and sched._fits(rid, 1):
                held.append(rid)
            return tier

        sched.choose_tier = recording
    res = sim.run()
    assert np.all(res.table.status == 3)
    assert held  # the alignment rule declined DRAM admissions that memory alone would have allowed


def test_a_migration_charges_the_kv_to_the_host_links():
    """A decode whose KV moves into HBM attends from the device this iteration; its KV crosses the links too."""
    s = build_system(offload_system(system="l3-plus"))
    table = RequestTable(np.zeros(2), np.array([3000, 5000]), np.array([100, 100]))
    table.generated[:] = 1
    table.kv_tier[:] = 1
    on_device = {"decode_ids": np.array([0, 1]), "decode_sub": np.array([1, 1], np.int8),
                 "decode_on_device": np.ones(2, bool)}  # fmt: skip
    plain, moving = Plan(**on_device), Plan(**on_device, migrate_ids=np.array([1]))
    a, b = s.run(plain, table, steps=1), s.run(moving, table, steps=1)
    extra = MODEL.n_layers * s.pcie(5001 * MODEL.kv_bytes_per_token_layer)
    assert b.busy["pcie_down"][0] - a.busy["pcie_down"][0] == pytest.approx(extra)
    assert np.array_equal(a.sub_mem_s, b.sub_mem_s)  # it still attends on the device
    assert b.durations[0] >= a.durations[0]


def test_decodes_move_into_hbm_when_nothing_waits():
    """l3-plus's rebalancing: once the queue is empty and HBM has room, the device tier's longest decodes move
    into HBM (their KV reserved there before it moves, freed on the device after); all complete, pools empty."""
    n = 60  # 12K-token prompts: the HBM tier (192K tokens per replica) holds about 15 of a replica's 30
    wl = make_workload(np.zeros(n), np.full(n, 12000), np.linspace(100, 1500, n).astype(int), mode="offline")
    runs = {}
    for rebalance in (False, True):
        sim = Simulator(offload_system(system="l3-plus", warmup_iterations=2, rebalance=rebalance), wl)
        moved = []
        for sc in sim.schedulers:
            def commit(plan, end, commit=sc.commit, moved=moved):
                moved.extend(plan.migrate_ids)
                return commit(plan, end)

            sc.commit = commit
        res = sim.run()
        assert np.all(res.table.status == 3)
        assert all(sc.kv.used_blocks == 0 and not sc._migrating for sc in sim.schedulers)
        assert len(moved) == sum(sc.promoted for sc in sim.schedulers)
        runs[rebalance] = res, np.array(moved, np.int64)
    (off, moved_off), (on, moved_on) = runs[False], runs[True]
    assert len(moved_off) == 0 and len(moved_on) > 0
    assert (on.table.kv_tier[moved_on] == HBM_TIER).all()  # they finished in HBM
    assert on.simulated_time_s < off.simulated_time_s  # the tail attends from HBM, no per-layer round trip


class _PerToken:
    """A device-time predictor of `s_per_token` seconds per decode token attended (feature 3 of a PIM row)."""

    def __init__(self, s_per_token: float):
        self.s = s_per_token

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x)[:, 3] * self.s


def test_a_device_sub_batch_pays_only_when_its_tokens_per_gpu_second_beat_the_hbm_batch():
    """Hand computation: 100 HBM requests take 50 ms on the GPU; a device request of 1,000 tokens takes 1 ms on
    the device, so at most 50 hide behind the HBM batch. With the device sub-batch's GPU time 20 ms at every size,
    150 tokens per 70 ms beat 100 per 50 ms (50 / 20 ms > 100 / 50 ms); with 30 ms no size does."""
    sched = Simulator(offload_system(system="l3-plus"), make_workload([0.0], [100], [10], mode="offline")).schedulers[0]
    sched.pim_pred = _PerToken(1e-6)
    sizes = np.arange(1, 101)
    assert sched._device_pays(100, sizes, 1000.0, 0.050, np.full(100, 0.020))
    assert not sched._device_pays(100, sizes, 1000.0, 0.050, np.full(100, 0.030))
    assert not sched._device_pays(100, sizes, 1e6, 0.050, np.full(100, 0.001))  # not one device request hides
    assert sched._device_pays(0, sizes, 1000.0, 0.050, np.full(100, 0.030))  # nothing in HBM to slow down


@pytest.mark.parametrize("context, device_open, rebalance, waits", [
    (3000, False, True, True),       # the device tier is closed: HBM's room goes to the running device request
    (3000, True, True, False),       # open: new requests take HBM's room as before
    (3000, False, False, False),     # nothing would move it in
    (10**7, False, True, False),     # it does not fit HBM's room: waiting would not help it
])  # fmt: skip
def test_while_the_device_tier_is_closed_hbm_room_goes_to_its_running_requests(context, device_open, rebalance,
                                                                                 waits):  # fmt: skip
    wl = make_workload([0.0], [100], [10], mode="offline")
    sched = Simulator(offload_system(system="l3-plus", rebalance=rebalance), wl).schedulers[0]
    sched.table.add([0.0, 0.0], [context, 100], [10, 10])
    sched.table.kv_tier[0] = 1  # request 0 decodes from the device
    sched.table.generated[0] = 1
    sched.running = np.array([0])
    sched._device_open = device_open
    assert sched._fits(1, 0)  # the head fits HBM
    assert sched.choose_tier(1) == (None if waits else 0)


class _Constant:
    def __init__(self, value: float):
        self.value = value

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.full(len(np.atleast_2d(x)), self.value)


def test_moving_a_decode_into_hbm_leaves_room_for_the_hbm_decodes_next_tokens():
    """Rebalancing reserves HBM for a device decode's KV only from the room left after this iteration's HBM
    decodes have their next tokens: here that room is one block short of it, so nothing moves and the
    iteration commits within capacity; with one more free block it moves."""
    for spare, moves in ((0, False), (1, True)):
        wl = make_workload([0.0], [100], [10], mode="offline")
        sched = Simulator(offload_system(system="l3-plus"), wl).schedulers[0]
        t, kv = sched.table, sched.kv
        ids = t.add(np.zeros(9), [160] * 8 + [100], [50] * 9)
        t.generated[ids] = 1
        t.prefilled[ids] = t.prefill_target[ids]
        t.status[ids] = 1
        t.kv_tier[8] = 1
        t.kv_blocks[:8] = 10  # 161 tokens attended next: an 11th block each
        t.kv_blocks[8] = kv.blocks(101)
        kv.allocate(int(t.kv_blocks[8]), 1)
        growth, moving = 8, int(kv.blocks(101))
        kv.allocate(int(kv.free_in(0) - sched._watermark_blocks[0]) - growth - moving + 1 - spare - 80, 0)
        kv.allocate(80, 0)  # the HBM decodes' own blocks
        sched.running = ids
        sched.gpu_pred, sched.pim_pred = _Constant(0.01), _PerToken(1e-4)
        plan = Plan(decode_ids=ids, decode_sub=np.array([0] * 8 + [1], np.int8),
                    decode_on_device=np.array([False] * 8 + [True]))  # fmt: skip
        sched._last = (np.array([0.01, 0.01]), np.array([0.0, 0.05]))
        sched._rebalance(plan)
        assert (len(plan.migrate_ids) == 1) == moves
        sched.commit(plan, 1.0)  # raises on an over-commit
        assert np.all(kv.tier_used <= kv.tier_capacity)


class _DenseAndHbmAttention:
    """A GPU-time predictor: 10 ms of dense work, plus 8 ms where the row attends HBM-tier tokens (feature 3,
    which rows have under asymmetric pipelining only)."""

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = np.atleast_2d(x)
        return 0.010 + (0.008 * (x[:, 3] > 0) if x.shape[1] > 3 else np.zeros(len(x)))


@pytest.mark.parametrize("p1, pays, pays_serial", [
    (0.006, True, True),     # split 28 ms; one batch 18 ms (24 ms with the attentions in series)
    (0.012, True, False),    # split 28 ms; one batch 22 ms: dense 10 + device 12, HBM's 8 beside it (30 in series)
    (0.020, False, False),   # split 30 ms (sub-batch 1's GPU part + its attention); one batch 30 ms
])  # fmt: skip
def test_one_batch_under_the_tier_overlaps_the_gpus_attention_with_the_devices(p1, pays, pays_serial):
    """Hand computation: 8 HBM decodes (sub-batch 0, GPU part 18 ms with their attention) and 4 device decodes
    (sub-batch 1, 10 ms, device attention p1). Two sub-batches take max(28 ms, p1, 18 ms, 10 ms + p1); one batch
    takes its 10 ms of dense work, then the HBM tier's 8 ms on the GPU beside the device's p1: max(18, 10 + p1) ms.
    Without a tier the same numbers are judged with the attention in series (18 ms + p1)."""
    untiered = with_overrides(get_system("l3-plus"), {"coordination": {"asymmetric": False}})
    for asymmetric, want in ((True, pays), (False, pays_serial)):
        spec = offload_system(system="l3-plus") if asymmetric else untiered.deploy(MODEL, ParallelSpec(tp=4, dp=2))
        sched = Simulator(spec, make_workload([0.0], [100], [10], mode="offline")).schedulers[0]
        ids = sched.table.add(np.zeros(12), [1000] * 12, [50] * 12)
        sched.table.kv_tier[ids[8:]] = 1
        on_device = np.arange(12) >= 8
        plan = Plan(decode_ids=ids, decode_sub=on_device.astype(np.int8),
                    decode_on_device=on_device if asymmetric else np.ones(12, bool))  # fmt: skip
        sched.gpu_pred = _DenseAndHbmAttention()
        sched._last = (np.array([0.018, 0.010]), np.array([0.0, p1]))
        assert sched._one_batch_pays(plan) == want, asymmetric


@pytest.mark.parametrize("costs, same_way, ran_one, tiered, untiered", [
    ((0.4, 0.5), 1, False, True, False),   # one batch measured cheaper: the tier takes it; without, the forest decides
    ((0.6, 0.5), 1, True, False, False),   # one batch measured dearer: split either way
    ((0.4, 0.5), 16, True, False, False),  # 16 one-batch iterations in a row: split once to re-measure it
    ((0.6, 0.5), 16, False, True, False),  # 16 split iterations in a row: the tier tries one batch once
    ((None, 0.5), 1, False, False, False),  # one batch never measured: the forest decides
])  # fmt: skip
def test_under_the_tier_the_measured_way_decides(costs, same_way, ran_one, tiered, untiered):
    """Under asymmetric pipelining the last measured time per request-step of each way (one batch, split) decides,
    and after `warmup_iterations` iterations one way the other is tried once; without a tier the measurement only
    vetoes what the predictors say. The predictors here always say split."""
    untiered_spec = with_overrides(get_system("l3-plus"), {"coordination": {"asymmetric": False}})
    for asymmetric, want in ((True, tiered), (False, untiered)):
        spec = offload_system(system="l3-plus") if asymmetric else untiered_spec.deploy(MODEL, ParallelSpec(tp=4, dp=2))
        sched = Simulator(spec, make_workload([0.0], [100], [10], mode="offline")).schedulers[0]
        assert sched.coord.warmup_iterations == 16
        ids = sched.table.add(np.zeros(4), [1000] * 4, [50] * 4)
        plan = Plan(decode_ids=ids, decode_sub=np.array([0, 0, 1, 1], np.int8),
                    decode_on_device=np.array([False, False, True, True]))  # fmt: skip
        sched._step_cost, sched._same_way, sched._one = list(costs), same_way, ran_one
        sched._one_batch_pays = lambda plan: False
        assert sched._choose_one_batch(plan) == want, asymmetric


def test_under_the_tier_only_decode_plans_with_device_decodes_measure_the_way():
    """A plan's time per request-step measures one batch or split only where there was a choice: decodes only,
    some on the device. A prefill's prompt work, or a plan attended wholly from HBM, would skew it."""
    sched = Simulator(offload_system(system="l3-plus"), make_workload([0.0], [100], [10], mode="offline")).schedulers[0]
    ids = sched.table.add(np.zeros(3), [1000] * 3, [50] * 3)
    some = np.array([False, False, True])
    assert sched._decides_the_way(Plan(decode_ids=ids, decode_on_device=some))
    assert not sched._decides_the_way(Plan(decode_ids=ids, decode_on_device=np.zeros(3, bool)))
    assert not sched._decides_the_way(Plan(decode_ids=ids[1:], decode_on_device=some[1:], prefill_ids=ids[:1],
                                           prefill_chunks=np.array([64]), prefill_prefix=np.array([0])))
