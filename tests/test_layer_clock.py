"""The compiled per-layer schedule and unit loads (systems/layer_clock.py) against plain references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l3.systems.layer_clock import PART_ROWS, layer_times, unit_loads
from l3.systems.offload import StepInterpolation


def _reference(n_layers, ranksets, seq, sub_of, parts, works):
    """Every layer run in Python, one step at a time, no shortcut."""
    steps = parts.shape[2]
    out = np.empty(steps)
    for s in range(steps):
        gpu = up = down = 0.0
        ret = [0.0, 0.0]
        ranks = np.zeros(works[0].shape[2])

        def barrier(t, ranks=ranks):
            nonlocal gpu, up, down
            if seq:
                gpu = up = down = t
                ranks[:] = t

        for layer in range(n_layers):
            for p, q in enumerate(sub_of):
                x = dict(zip(PART_ROWS, parts[p, :, s], strict=True))
                w = works[p][:, layer % ranksets, :]
                start = max(gpu, ret[q])
                dense_end = start + ((x["merge"] + x["post"]) if layer else 0.0) + x["pre"]
                gpu = dense_end + x["pattn"]
                barrier(gpu)
                up_end = max(gpu if seq else dense_end, up) + x["up"]
                up = up_end + x["up_bg"]
                barrier(up)
                active = (w > 0).any(axis=0)
                if not active.any():
                    ret[q] = gpu
                    continue
                ready = up if seq else up_end
                ends = np.where(w[s] > 0, np.maximum(ranks, ready) + w[s], ready)[active]
                ranks[active & (w[s] > 0)] = ends[(w[s] > 0)[active]]
                pim_end = ends.max()
                barrier(pim_end)
                ret[q] = max(pim_end + x["host_merge"], down) + x["down"]
                down = ret[q] + x["down_bg"]
                barrier(down)
        free = gpu
        for p, q in enumerate(sub_of):
            x = dict(zip(PART_ROWS, parts[p, :, s], strict=True))
            free = max(free, ret[q]) + x["merge"] + x["post"] + x["head"]
        out[s] = max(free, up, down)
    return out


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), two=st.booleans(), seq=st.booleans(), ranksets=st.sampled_from([1, 2, 4]),
       layers=st.integers(1, 13), steps=st.integers(1, 4), sparse=st.booleans())  # fmt: skip
def test_schedule_equals_every_layer_run(seed, two, seq, ranksets, layers, steps, sparse):
    """Durations (with the periodic shortcut) equal running every layer; a one-step record's intervals end at the
    duration, and no unit's intervals overlap."""
    rng = np.random.default_rng(seed)
    n = 2 * ranksets
    sub_of = [0, 1] if two else [int(rng.integers(2))]
    parts = rng.uniform(0, 1e-3, (len(sub_of), len(PART_ROWS), steps)) * (rng.random((1, len(PART_ROWS), 1)) < 0.8)
    # the same per-layer work every step, or growing steadily, as in a run of decode steps; some units idle
    base = rng.uniform(0, 2e-3, (len(sub_of), 1, ranksets, n)) * (rng.random((len(sub_of), 1, ranksets, n)) < 0.6
                                                                    if sparse else 1.0)  # fmt: skip
    works = [np.ascontiguousarray(b * (1 + 0.01 * np.arange(steps))[:, None, None]) for b in base]
    got, _ = layer_times(layers, ranksets, seq, sub_of, parts, works, False, [])
    want = _reference(layers, ranksets, seq, sub_of, parts, works)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
    if steps == 1:
        d, rec = layer_times(layers, ranksets, seq, sub_of, parts, works, True, [f"u{r}" for r in range(n)])
        assert d[0] == pytest.approx(got[0], rel=1e-12)  # recording runs every layer (no shortcut)
        intervals = list(rec)
        assert all(iv.start < iv.end <= d[0] * (1 + 1e-12) for iv in intervals)
        for r in range(n):
            mine = sorted((iv.start, iv.end) for iv in intervals if iv.device == f"u{r}")
            assert all(a[1] <= b[0] * (1 + 1e-12) for a, b in itertools.pairwise(mine))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), ranksets=st.sampled_from([1, 2, 4]), channels=st.integers(1, 5),
       steps=st.sampled_from([1, 2, 7, 300, 700]))  # fmt: skip
def test_unit_loads_match_float64_reference(seed, ranksets, channels, steps):
    """The loads of every step (interpolated between the iteration's samples) against numpy in float64."""
    rng = np.random.default_rng(seed)
    n = channels * ranksets
    interp = StepInterpolation(steps)
    shape = (len(interp.offsets), ranksets, n)
    work_at = rng.uniform(0, 1e-3, shape) * (rng.random(shape) < 0.7)
    stalled_at = rng.uniform(0, 1e-4, shape)
    work, stalled = interp(work_at), interp(stalled_at)
    reps = rng.integers(0, 30, ranksets)
    *loads, full = unit_loads(work_at, stalled_at, interp.segment, interp.weight0, interp.weight, reps, channels)
    slowest, mean, ratio, idle, by_rankset, stall, per_unit = loads
    np.testing.assert_array_equal(full, work)
    mu = work.mean(axis=2)
    np.testing.assert_allclose(slowest, work.max(axis=2) @ reps, rtol=1e-12)
    np.testing.assert_allclose(mean, mu @ reps, rtol=1e-12)
    working = (work > 0).sum(axis=2)  # the ratio is over the mean working unit's time
    mu_working = np.where(working > 0, work.sum(axis=2) / np.maximum(working, 1), 1.0)
    np.testing.assert_allclose(ratio, np.where(working > 0, work.max(axis=2) / mu_working, 1) @ reps, rtol=1e-12)
    np.testing.assert_allclose(idle, (work == 0).mean(axis=2) @ reps, rtol=1e-12)
    by = work.reshape(steps, ranksets, channels, ranksets).mean(axis=2)
    np.testing.assert_allclose(by_rankset, np.einsum("srq,r->sq", by, reps), rtol=1e-12, atol=1e-18)
    st_ref = np.einsum("srcq,r->sq", stalled.reshape(steps, ranksets, channels, ranksets), reps) / channels
    np.testing.assert_allclose(stall, st_ref, rtol=1e-12, atol=1e-18)
    np.testing.assert_allclose(per_unit, np.einsum("srn,r->sn", work, reps), rtol=1e-12, atol=1e-18)
