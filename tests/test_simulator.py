"""Serving-simulator invariants (property-based) and hand-checked timing of tiny cases."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_workload, small_system
from l3.report.summary import summarize
from l3.sched.kv import KvPool
from l3.sched.plan import BatchShape
from l3.sched.requests import Status
from l3.sim.simulator import Simulator
from l3.specs.model import get_model
from l3.systems.gpu_only import GpuOnlySystem
from l3.systems.offload import BULK_SAMPLE_EVERY, StepInterpolation

LLAMA = get_model("llama-2-7b")


@st.composite
def workloads(draw):
    n = draw(st.integers(1, 40))
    prompt = draw(st.lists(st.integers(1, 3000), min_size=n, max_size=n))
    output = draw(st.lists(st.integers(1, 3000), min_size=n, max_size=n))
    online = draw(st.booleans())
    gaps = draw(st.lists(st.floats(0, 2.0), min_size=n, max_size=n)) if online else [0.0] * n
    return make_workload(np.cumsum(gaps), prompt, output, "online" if online else "offline")


class CheckedPool(KvPool):
    """A KV pool that records its peak use, to check it never exceeds capacity."""

    peak = 0

    def allocate(self, n_blocks: int, tier: int = 0) -> None:
        super().allocate(n_blocks, tier)
        CheckedPool.peak = max(CheckedPool.peak, *(self.tier_used / np.maximum(self.tier_capacity, 1)))


def run(workload, dp=1, bulk=True, **sched):
    dep = small_system(dp=dp, **sched).deploy(LLAMA)
    return Simulator(dep, workload, bulk=bulk).run()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wl=workloads(), dp=st.integers(1, 3), max_batch=st.sampled_from([0, 3]))
def test_every_request_ends_completed_or_rejected(wl, dp, max_batch):
    res = run(wl, dp=dp, max_batch_size=max_batch)
    t = res.table
    assert np.all((t.status == Status.DONE) | (t.status == Status.REJECTED))
    done = t.status == Status.DONE
    assert np.array_equal(t.generated[done], t.output[done])
    assert all(t.reject_reason[i] for i in np.flatnonzero(~done))
    # Time never runs backwards: arrival <= admission <= first token <= finish, plans in order per replica.
    assert np.all(t.admitted_s[done] >= t.arrival[done])
    assert np.all(t.first_token_s[done] > t.admitted_s[done])
    assert np.all(t.finish_s[done] >= t.first_token_s[done])
    s = res.metrics.series()
    assert np.all(s[:, 2] >= s[:, 1])
    for r in range(dp):
        rows = s[s[:, 0] == r]
        assert np.all(np.diff(rows[:, 1]) >= 0) and np.all(rows[1:, 1] >= rows[:-1, 2] - 1e-9)
    assert res.simulated_time_s >= s[:, 2].max(initial=0) - 1e-9
    if max_batch:  # never more requests in a batch than allowed, even when several are admitted at once
        assert s[:, 4].max(initial=0) <= max_batch


@settings(max_examples=25, deadline=None)
@given(wl=workloads())
def test_kv_never_exceeds_capacity(wl):
    import l3.sched.build as simmod

    CheckedPool.peak = 0
    orig = simmod.KvPool
    simmod.KvPool = CheckedPool
    try:
        sim = Simulator(small_system().deploy(LLAMA), wl)
        res = sim.run()
    finally:
        simmod.KvPool = orig
    assert 0 < CheckedPool.peak <= 1.0 or (res.table.status == Status.REJECTED).all()
    assert all(s.kv.used_blocks == 0 for s in sim.schedulers)  # everything freed at the end
    assert res.table.kv_blocks.sum() == 0


@pytest.mark.slow
@settings(max_examples=20, deadline=None)
@given(wl=workloads())
def test_bulk_advance_equals_single_steps(wl):
    a, b = run(wl, bulk=True), run(wl, bulk=False)
    np.testing.assert_allclose(a.table.finish_s, b.table.finish_s, rtol=1e-9, equal_nan=True)
    np.testing.assert_array_equal(a.table.status, b.table.status)
    assert a.metrics.steps == b.metrics.steps
    assert a.metrics.tbt.total == b.metrics.tbt.total
    for q in (0.5, 0.99):
        np.testing.assert_allclose(a.metrics.tbt.quantile(q), b.metrics.tbt.quantile(q), rtol=0.005)


def test_same_seed_same_summary():
    from l3.workload import load_workload

    def once(seed):
        wl = load_workload("openr1", n_requests=30, seed=seed)
        s = summarize(Simulator(get_system_small(), wl).run())
        s.pop("wall_time_s"), s.pop("wall_time_parts_s")
        return s

    assert once(3) == once(3)
    assert once(3) != once(4)


def get_system_small():
    return small_system(kv_fraction_reserve=0.5, dp=2).deploy(LLAMA)


def test_single_request_time_matches_hand_computation():
    """One request: a prefill iteration, then output-1 decode steps whose context grows by one each."""
    prompt, output = 300, 50
    dep = small_system().deploy(LLAMA)
    res = Simulator(dep, make_workload([0.0], [prompt], [output])).run()
    sysm = GpuOnlySystem(dep)
    cost = sysm.gpu
    L = LLAMA.n_layers
    # prefill: 300 tokens <= 512 budget: one iteration of 300 tokens, causal pairs 300*301/2, samples 1 token
    pre = L * cost.layer(prompt, 0, 0.0, prompt * (prompt + 1) / 2, prompt).total + cost.embed_and_head(prompt, 1)
    ctx = prompt + np.arange(1, output)  # decode step g attends prompt + g tokens
    dec = L * cost.layer(1, 1, ctx.astype(float), 0.0, 0.0).total + cost.embed_and_head(1, 1)
    expected = float(pre) + float(np.sum(dec))
    assert abs(res.simulated_time_s - expected) <= 1e-9 * expected
    assert abs(res.table.first_token_s[0] - float(pre)) <= 1e-12
    s = summarize(res)
    assert s["requests_completed"] == 1 and s["output_tokens"] == output


def test_oversized_request_rejected_with_reason():
    dep = small_system().deploy(LLAMA)
    sim = Simulator(dep, make_workload([0, 0], [100, 10**6], [10, 10]))
    res = sim.run()
    assert res.table.status.tolist() == [Status.DONE, Status.REJECTED]
    assert "kv_exceeds_capacity" in res.table.reject_reason[1]


def test_memory_pressure_preempts_and_recovers():
    """Many long requests at once on a tiny pool: preemption happens, nobody is lost."""
    dep = small_system().deploy(LLAMA)
    cap = GpuOnlySystem(dep).kv_capacity_tokens
    n = 8
    res = Simulator(dep, make_workload([0.0] * n, [cap // 8] * n, [cap // 4] * n, "offline")).run()
    assert res.table.preemptions.sum() > 0
    assert np.all(res.table.status == Status.DONE)


def test_batch_shape_counts_causal_pairs():
    from l3.sched.plan import Plan

    plan = Plan(prefill_ids=np.array([0, 1]), prefill_chunks=np.array([4, 2]), prefill_prefix=np.array([0, 10]),
                prefill_completes=np.array([True, False]))  # fmt: skip
    shape = BatchShape.of(plan, np.empty(0))
    # chunk of 4 from 0: 1+2+3+4 = 10 pairs; chunk of 2 after 10: 11+12 = 23 pairs
    assert shape.prefill_pairs == 33 and shape.prefill_kv_tokens == 16 and shape.n_sampled == 1


@given(st.integers(0, 3000), st.integers(1, 12))
def test_timeline_sample_is_bounded_and_spread_over_the_run(offered, limit):
    from l3.sched.timing import Interval
    from l3.sim.metrics import TimelineSample

    s = TimelineSample(limit)
    for i in range(offered):
        if s.wants():
            s.add(i, (0, float(i), [Interval("gpu", 0.0, 1.0, "dense")]))
    kept = sorted({p for _, p, *_ in s.rows})
    assert len(kept) <= limit
    assert kept == list(range(0, offered, s.stride))[: len(kept)]  # every stride-th iteration, from the first
    if offered:
        assert kept[-1] + 2 * s.stride > offered - 1  # reaches the end of the run: no gap beyond two strides
    assert len(kept) >= min(offered, limit // 2 + 1) or s.stride == 1


def test_timeline_png_shows_iterations_from_the_steady_state():
    from l3.report.plots import pick_iterations

    wl = make_workload(np.zeros(40), np.full(40, 64), np.linspace(200, 1200, 40).astype(int), mode="offline")
    res = Simulator(small_system().deploy(LLAMA), wl).run()
    m = res.metrics
    plans = sorted({p for _, p, *_ in m.timeline})
    assert 2 <= len(plans) <= 8
    targets = m.output_times([0.25, 0.5, 0.75])
    chosen = pick_iterations(m.timeline, m.series(), targets)
    starts = m.series()[chosen, 1]
    assert len(chosen) == 3 and starts[-1] > targets[0]  # not only the run's first iterations
    nearest = min(abs(m.series()[p, 1] - targets[0]) for p in plans)
    assert abs(starts[0] - targets[0]) == nearest  # the first panel: the sampled iteration nearest 25% of output


@settings(max_examples=60, deadline=None)
@given(spans=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 40)), min_size=1, max_size=40))
def test_timeline_bars_cover_exactly_the_union_of_intervals(spans):
    """A rankset's lane draws the union of its ranks' intervals: disjoint bars in time order that cover a point
    exactly where some interval does (checked on a grid finer than the integer endpoints)."""
    from l3.report.plots import _union

    intervals = [(float(a), float(a + w)) for a, w in spans]
    bars = _union(intervals)
    starts = [a for a, _ in bars]
    assert starts == sorted(starts)
    assert all(a + w < b for (a, w), (b, _) in itertools.pairwise(bars))  # disjoint, gaps between
    for x in np.arange(-0.25, 242.0, 0.5):
        assert any(a <= x <= b for a, b in intervals) == any(a <= x <= a + w for a, w in bars)


@settings(max_examples=30, deadline=None)
@given(steps=st.integers(2, 900), seed=st.integers(0, 10**6))
def test_bulk_interpolation_is_linear_between_samples(steps, seed):
    """A bulk run's per-step values: the samples at the iteration's offsets, linear in between (np.interp per
    element as the float64 reference), whether the run has one segment (two samples) or several."""
    interp = StepInterpolation(steps)
    offsets = interp.offsets
    assert offsets[0] == 0 and offsets[-1] == steps - 1 and np.diff(offsets).max() <= BULK_SAMPLE_EVERY
    values = np.random.default_rng(seed).random((len(offsets), 3, 2))
    got = interp(values)
    want = np.stack([[np.interp(np.arange(steps), offsets, values[:, a, b]) for b in range(2)] for a in range(3)])
    assert got.shape == (steps, 3, 2)
    np.testing.assert_allclose(got, want.transpose(2, 0, 1), rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(got[offsets], values)
