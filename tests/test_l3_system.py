"""The L3 system's iteration timeline: resources, dependencies, and the ablations' arithmetic."""

from __future__ import annotations

import functools
import itertools
from collections import defaultdict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_workload
from l3.report.summary import summarize
from l3.sched.plan import BatchShape, Plan
from l3.sched.requests import RequestTable
from l3.sched.timing import IMBALANCE_DECODE_BINS
from l3.sim.simulator import Simulator
from l3.specs.model import ModelSpec, get_model
from l3.specs.system import ParallelSpec, SystemSpec, get_system, with_overrides
from l3.systems.l3 import L3System

TINY = ModelSpec(name="tiny", n_layers=3, d_model=512, n_heads=4, n_kv_heads=4, head_dim=128, ffn_dim=1024,
                 ffn_kind="gated", vocab_size=1000)  # fmt: skip


@functools.cache
def system(pipeline=True, overlap=True, policy="halving", channels=2):
    spec = SystemSpec.build({
        "name": "tiny-l3", "kind": "l3",
        "gpu": {"preset": "a100-80gb", "count": 1},
        "parallelism": {"tiny": {"tp": 1, "dp": 1}},
        "pim": {"org_overrides": {"channels": channels, "rows": 4096}},
        "coordination": {"pipeline": pipeline, "rankset_overlap": overlap, "policy": policy},
        "scheduler": {"max_batched_tokens": 256},
    })  # fmt: skip
    return L3System(spec.deploy(TINY))


def table_and_plan(contexts_a, contexts_b, prefill=(0, 0)):
    """Requests with the given decode contexts in sub-batches A and B, plus optional prefill chunks."""
    ctx = list(contexts_a) + list(contexts_b)
    n_dec = len(ctx)
    pre = [c for c in prefill if c]
    t = RequestTable(np.zeros(n_dec + len(pre)), np.array(ctx + pre), np.full(n_dec + len(pre), 10**6))
    t.generated[:n_dec] = 1
    t.prompt[:n_dec] -= 1  # context = prompt + generated
    t.placement[:] = np.arange(len(t.placement)) % 2
    dec = np.arange(n_dec)
    sub = np.array([0] * len(contexts_a) + [1] * len(contexts_b), np.int8)
    pids = np.arange(n_dec, n_dec + len(pre))
    psub = np.array([i for i, c in enumerate(prefill) if c], np.int8)
    plan = Plan(dec, pids, np.array(pre, np.int64), np.zeros(len(pre), np.int64), np.ones(len(pre), bool),
                decode_sub=sub, prefill_sub=psub, decode_on_device=np.ones(n_dec, bool),
                prefill_on_device=np.ones(len(pre), bool))  # fmt: skip
    return t, plan


def test_no_device_runs_two_things_at_once():
    sysm = system()
    t, plan = table_and_plan([300, 40, 7000], [1200, 90], prefill=(128, 64))
    timing = sysm.run(plan, t, 1, record=True)
    lanes = defaultdict(list)
    for iv in timing.intervals:
        lanes[iv.device].append((iv.start, iv.end))
    assert {"gpu", "pcie_up", "pcie_down"} <= set(lanes) and any(d.startswith("rank") for d in lanes)
    for dev, ivs in lanes.items():
        ivs.sort()
        for (_, e0), (s1, _) in itertools.pairwise(ivs):
            assert s1 >= e0 - 1e-12, dev
    assert max(e for ivs in lanes.values() for _, e in ivs) <= timing.durations[0] + 1e-12


def test_imbalance_is_also_counted_by_the_sub_batchs_device_decodes():
    """A sub-batch of 5 PIM decodes and one of 20: each sub-batch's layers and its summed imbalance fall in the bin
    of its own count of device decodes, and the bins add up to the totals."""
    t, plan = table_and_plan([300, 40, 7000, 900, 2500], [1200, 90, 64, 4000] * 5)
    stats = system().run(plan, t, 1).stats
    layers = {lo: stats.get(f"device_layers_n{lo}", np.zeros(1))[0] for lo in IMBALANCE_DECODE_BINS}
    assert layers == {1: 0.0, 4: TINY.n_layers, 16: TINY.n_layers, 64: 0.0}
    assert stats["imbalance_n4"][0] >= TINY.n_layers and stats["imbalance_n16"][0] >= TINY.n_layers
    assert stats["imbalance_n4"][0] + stats["imbalance_n16"][0] == pytest.approx(stats["imbalance"][0])


def test_dependencies_hold_in_the_timeline():
    sysm = system()
    t, plan = table_and_plan([500, 2000], [800], prefill=(0, 96))
    ivs = sysm.run(plan, t, 1, record=True).intervals
    for name in "AB":
        dense = [iv for iv in ivs if iv.device == "gpu" and iv.label == f"{name} dense"]
        qkv = [iv for iv in ivs if iv.label == f"{name} QKV"]
        out = [iv for iv in ivs if iv.label == f"{name} out"]
        assert len(dense) == len(qkv) == len(out) == TINY.n_layers
        for layer in range(TINY.n_layers):
            attn = [iv for iv in ivs if iv.label == f"{name} attn" and iv.layer == layer]
            assert attn
            assert qkv[layer].start >= dense[layer].end - 1e-12  # Q/K/V leave after the projection
            assert min(a.start for a in attn) >= qkv[layer].end - 1e-12  # attention after Q/K/V arrive
            assert out[layer].start >= max(a.end for a in attn) - 1e-12
            if layer + 1 < TINY.n_layers:  # next layer's dense work after this layer's output is back
                assert dense[layer + 1].start >= out[layer].end - 1e-12


def test_without_pipeline_and_ranksets_time_is_the_plain_sum():
    sysm = system(pipeline=False, overlap=False)
    t, plan = table_and_plan([300, 4000], [1000], prefill=(64, 0))
    got = sysm.run(plan, t, 1).durations[0]
    # Hand computation: every part of both sub-batches, one after another.
    L, R = TINY.n_layers, sysm.ranksets
    total = 0.0
    for x in (0, 1):
        sb = plan.sub_batch(x)
        ctx = t.context(sb.decode_ids).astype(float)
        shape = BatchShape.of(sb, ctx)
        layer = sysm.gpu.layer(shape.n_tokens, 0, 0.0, shape.prefill_pairs, shape.prefill_kv_tokens)
        total += L * float(layer.pre_attn + layer.prefill_attn + layer.post_attn)
        total += float(sysm.gpu.embed_and_head(shape.n_tokens, shape.n_sampled))
        total += L * sysm.pcie(shape.prefill_tokens * TINY.kv_bytes_per_token_layer)
        if len(sb.decode_ids):
            total += L * sysm.pcie(len(ctx) * (TINY.q_dim + 2 * TINY.kv_dim) * 2)  # Q, K, V up
            total += L * sysm.pcie(len(ctx) * TINY.q_dim * 2)  # attention output down
            work = sysm.pim_layer_work(sb.decode_ids, ctx, t.placement[sb.decode_ids], sb.prefill_ids,
                                       sb.prefill_chunks, t.placement[sb.prefill_ids], np.array([0]))
            total += sum(work[0, layer % R].max() for layer in range(L))  # ranks start together, slowest ends
    assert got == pytest.approx(total, rel=1e-12)


@settings(max_examples=25, deadline=None)
@given(a=st.lists(st.integers(1, 20000), min_size=0, max_size=6), b=st.lists(st.integers(1, 20000), max_size=6),
       pa=st.sampled_from([0, 32, 200]), pb=st.sampled_from([0, 48]))  # fmt: skip
def test_pipeline_and_ranksets_never_make_it_slower(a, b, pa, pb):
    if not (a or b or pa or pb):
        return
    t, plan = table_and_plan(a, b, prefill=(pa, pb))
    base = system(pipeline=False, overlap=False).run(plan, t, 1).durations[0]
    for pipeline, overlap in ((True, False), (False, True), (True, True)):
        assert system(pipeline, overlap).run(plan, t, 1).durations[0] <= base * (1 + 1e-12)


def test_bulk_steps_match_single_steps():
    sysm = system()
    t, plan = table_and_plan([300, 5000], [1000, 20], prefill=(0, 0))
    k = 600
    bulk = sysm.run(plan, t, k).durations
    singles = []
    for _ in range(k):
        singles.append(sysm.run(plan, t, 1).durations[0])
        t.generated[plan.decode_ids] += 1
    np.testing.assert_allclose(bulk, singles, rtol=0.01)


@pytest.mark.parametrize("policy", ["alignment", "halving", "fill-capacity"])
def test_l3_serves_every_request(policy):
    rng = np.random.default_rng(1)
    n = 60
    wl = make_workload(np.zeros(n), rng.integers(10, 400, n), rng.integers(5, 600, n), "offline")
    spec = system(policy=policy).dep.system
    res = Simulator(spec.deploy(TINY), wl).run()
    assert np.all(res.table.status == 3)


def test_odd_head_counts_are_placed_and_served():
    """3 KV heads of dim 64 (a SmolLM2-like shape): chip groups cannot be filled; the request-layer stays on
    one rank (shard 1) and every request is served."""
    odd = ModelSpec(name="odd", n_layers=4, d_model=576, n_heads=9, n_kv_heads=3, head_dim=64, ffn_dim=1536,
                    ffn_kind="gated", vocab_size=49152)  # fmt: skip
    spec = SystemSpec.build({"name": "odd-l3", "kind": "l3", "gpu": {"preset": "a100-80gb", "count": 1},
                             "parallelism": {"odd": {"tp": 1, "dp": 1}},
                             "pim": {"org_overrides": {"channels": 2, "rows": 4096}}})  # fmt: skip
    dep = spec.deploy(odd)
    assert L3System(dep).shard == 1
    rng = np.random.default_rng(2)
    wl = make_workload(np.sort(rng.uniform(0, 1, 40)), rng.integers(5, 300, 40), rng.integers(2, 200, 40))
    assert np.all(Simulator(dep, wl).run().table.status == 3)


@pytest.mark.slow  # 15 s; the quick run keeps test_l3_serves_every_request and the simulator's and tiers' properties
@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 30), seed=st.integers(0, 2**16), policy=st.sampled_from(["alignment", "halving"]))
def test_l3_every_request_ends_and_memory_is_returned(n, seed, policy):
    rng = np.random.default_rng(seed)
    wl = make_workload(np.sort(rng.uniform(0, 0.5, n)), rng.integers(1, 3000, n), rng.integers(1, 3000, n))
    sim = Simulator(system(policy=policy).dep.system.deploy(TINY), wl)
    res = sim.run()
    assert np.all((res.table.status == 3) | (res.table.status == 4))
    assert all(s.kv.used_blocks == 0 for s in sim.schedulers)
    done = res.table.status == 3
    assert np.array_equal(res.table.generated[done], res.table.output[done])


def test_rankset_overlap_removes_transfer_stalls():
    """Each rankset's time blocked by transfers is reported; without rankset overlap every write of a channel
    blocks all its ranks, so the stall grows (issue: the overlap ablation must state what it removes)."""
    wl = make_workload(np.zeros(12), np.full(12, 3000), np.full(12, 40), mode="offline")
    stalls = {}
    for overlap in (True, False):
        spec = with_overrides(get_system("l3"), {"coordination": {"rankset_overlap": overlap}})
        s = summarize(Simulator(spec.deploy(get_model("opt-66b"), ParallelSpec(tp=2, dp=4)), wl).run())
        stalls[overlap] = s["transfer_stall_s"]
        assert sorted(stalls[overlap]) == [f"rankset{q}" for q in range(4)]
    assert all(0 < stalls[True][k] < stalls[False][k] for k in stalls[True])


def test_cxl_attached_pim_adds_the_expanders_link_to_every_transfer():
    from l3.errors import SpecError
    from l3.specs.hardware import get_link

    model = get_model("llama-2-7b")
    dimm = L3System(get_system("l3-h200-ddr5").deploy(model, ParallelSpec(tp=2, dp=4)))
    cxl = L3System(get_system("l3-h200-cxl").deploy(model, ParallelSpec(tp=2, dp=4)))
    link, devices = cxl.cxl
    assert dimm.cxl is None and link == get_link("cxl2-x16") and devices == 2  # 8 expanders over 4 replicas
    for nbytes in (4096.0, 64e6):  # a decode vector (latency-bound), a prefill chunk's KV (bandwidth-bound)
        extra = cxl.pcie(nbytes) - dimm.pcie(nbytes)
        assert extra == pytest.approx(link.latency_s + nbytes / devices / link.bw)
    assert cxl.link_j_per_byte == pytest.approx(dimm.link_j_per_byte + link.pj_per_bit * 8e-12)
    with pytest.raises(SpecError, match="split evenly over cxl_devices"):
        with_overrides(get_system("l3-h200-cxl"), {"pim": {"cxl_devices": 7}})
