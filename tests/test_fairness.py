"""Fair comparisons: parallelism chosen by probe, the hardware bound, steady-state throughput, OOM handling."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_workload
from l3.parallel import process_map
from l3.report.compare import compare
from l3.report.study import ratio_cell
from l3.report.summary import largest_losses, summarize
from l3.run import choose_parallelism, probe_workload, rejected_by
from l3.sched.plan import Plan
from l3.sched.timing import LOSSES, IterationTiming
from l3.sim.metrics import Metrics, output_times
from l3.sim.simulator import Simulator
from l3.specs.model import ModelSpec, get_model
from l3.specs.system import ParallelSpec, SystemSpec

LLAMA = get_model("llama-2-7b")
TINY = ModelSpec(name="tiny", n_layers=3, d_model=512, n_heads=4, n_kv_heads=4, head_dim=128, ffn_dim=1024,
                 ffn_kind="gated", vocab_size=1000)  # fmt: skip


def gpu_only(count: int = 4, reserve: float = 0.8) -> SystemSpec:
    """llama-2-7b on `count` A100s with most HBM reserved: TP1 replicas hold a few thousand tokens of KV."""
    return SystemSpec.build({"name": "gpus", "kind": "gpu-only", "parallelism": "auto",
                             "gpu": {"preset": "a100-80gb", "count": count, "memory_reserve_fraction": reserve},
                             "scheduler": {"max_batched_tokens": 512}})  # fmt: skip


def test_auto_choice_is_the_best_candidate_by_its_own_probe():
    wl = make_workload(np.zeros(60), np.full(60, 300), np.arange(60) * 40 + 100, "offline")
    spec = gpu_only()
    dep = choose_parallelism(spec, LLAMA, wl)
    rows = dep.selection["candidates"]
    assert [(r["tp"], r["dp"]) for r in rows] == [(1, 4), (2, 2), (4, 1)]
    probed = [r for r in rows if r["probe_steady_tok_s"] is not None]
    assert len(probed) == 3 and dep.selection["probe_requests"] == 60
    best = max(probed, key=lambda r: r["probe_steady_tok_s"])
    assert (dep.tp, dep.dp, dep.rule) == (best["tp"], best["dp"], "auto") and best["status"] == "chosen"
    # the recorded figure is what the probe itself measures
    again = Simulator(spec.deploy(LLAMA, ParallelSpec(tp=best["tp"], dp=best["dp"])), probe_workload(wl)).run()
    assert again.metrics.steady_throughput() == pytest.approx(best["probe_steady_tok_s"], rel=1e-12)


def test_probing_on_two_processes_records_the_same_choice():
    """The candidates' probes run side by side in spawned workers (l3.parallel) and give the figures the
    in-process probes give, in candidate order."""
    wl = make_workload(np.zeros(40), np.full(40, 300), np.arange(40) * 30 + 100, "offline")
    here, apart = (choose_parallelism(gpu_only(), LLAMA, wl, jobs=j) for j in (1, 2))
    assert apart.selection == here.selection and (apart.tp, apart.dp) == (here.tp, here.dp)
    assert sum(r["status"] == "probed" for r in here.selection["candidates"]) == 2

@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(5, 60), dp=st.sampled_from([1, 2, 4]), online=st.booleans(), seed=st.integers(0, 1000))
def test_a_run_stopped_at_its_90_percent_time_gives_the_whole_runs_steady_throughput(n, dp, online, seed):
    """The probe stops once its 90% time is settled (`Simulator.run(until_output=...)`): on any workload, with
    replicas whose clocks interleave and requests arriving over time, the steady-state figure is the whole run's
    to rounding, from fewer plans, and the stopped run knows the whole run's output."""
    rng = np.random.default_rng(seed)
    arrivals = np.sort(rng.uniform(0, 30, n)) if online else np.zeros(n)
    wl = make_workload(arrivals, rng.integers(10, 600, n), rng.integers(1, 400, n), "online" if online else "offline")
    dep = gpu_only().deploy(LLAMA, ParallelSpec(tp=4 // dp, dp=dp))
    whole, stopped = Simulator(dep, wl).run(), Simulator(dep, wl).run(until_output=0.9)
    assert stopped.output_total == whole.output_total == float(whole.table.output.sum())
    assert len(stopped.metrics.series()) <= len(whole.metrics.series())
    expected = whole.metrics.steady_throughput()
    got = stopped.metrics.steady_throughput(stopped.output_total)
    assert (got is None) == (expected is None)
    if expected is not None:
        assert got == pytest.approx(expected, rel=1e-12)



@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(largest=st.integers(1_000, 60_000), seed=st.integers(0, 100))
def test_a_candidate_that_cannot_hold_the_largest_request_is_never_chosen(largest, seed):
    rng = np.random.default_rng(seed)
    n = 12
    out = rng.integers(50, 400, n)
    out[rng.integers(n)] = largest
    wl = make_workload(np.zeros(n), np.full(n, 64), out, "offline")
    spec = gpu_only()
    dep = choose_parallelism(spec, LLAMA, wl)
    holds = [p for p, why in spec.parallel_candidates(LLAMA) if why is None
             and rejected_by(spec.deploy(LLAMA, p), wl) == 0]  # fmt: skip
    if holds:  # the choice holds every request
        assert rejected_by(dep, wl) == 0 and (dep.tp, dep.dp) in {(p.tp, p.dp) for p in holds}
    for r in dep.selection["candidates"]:
        if r["rejected"]:
            assert not r["status"].startswith("chosen") or not holds


def _spec(kind: str, dp: int) -> tuple[SystemSpec, ModelSpec]:
    if kind == "gpu-only":
        return SystemSpec.build({"name": "g", "kind": "gpu-only", "parallelism": {"default": {"tp": 1, "dp": dp}},
                                 "gpu": {"preset": "a100-80gb", "count": dp, "memory_reserve_fraction": 0.83},
                                 "scheduler": {"max_batched_tokens": 512}}), LLAMA  # fmt: skip
    base = {"name": kind, "gpu": {"preset": "a100-80gb", "count": dp}, "scheduler": {"max_batched_tokens": 256},
            "parallelism": {"default": {"tp": 1, "dp": dp}}}  # fmt: skip
    if kind == "l3":
        return SystemSpec.build(base | {"kind": "l3", "pim": {"org_overrides": {"channels": 2, "rows": 4096}}}), TINY
    return SystemSpec.build(base | {"kind": "pooled-attention", "attention": {
        "capacity_bytes": 2e9, "bandwidth": 1e12, "write_bandwidth": 5e10, "memory": "dimm"}}), TINY  # fmt: skip


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["gpu-only", "l3", "pooled"]), dp=st.sampled_from([1, 2]),
       n=st.integers(1, 30), seed=st.integers(0, 10_000), online=st.booleans())  # fmt: skip
def test_the_bound_is_never_below_the_achieved_throughput(kind, dp, n, seed, online):
    rng = np.random.default_rng(seed)
    arrival = np.cumsum(rng.exponential(0.5, n)) if online else np.zeros(n)
    wl = make_workload(arrival, rng.integers(1, 2000, n), rng.integers(1, 1500, n), "online" if online else "offline")
    spec, model = _spec(kind, dp)
    s = summarize(Simulator(spec.deploy(model), wl).run())
    if not s["requests_completed"]:
        return
    assert s["bound_tok_s"] >= s["throughput_tok_s"] * (1 - 1e-9)
    assert 0 < s["bound_fraction"] <= 1 + 1e-9
    assert s["steady_bound_fraction"] is None or 0 < s["steady_bound_fraction"] <= 1 + 1e-9
    parts = s["time_breakdown"]
    assert set(parts) <= {"bound", "replica_idle", *LOSSES}
    assert sum(parts.values()) == pytest.approx(1.0, rel=1e-9)
    assert all(v >= -1e-9 for v in parts.values()), parts


def test_largest_losses_leave_out_the_bound_and_the_small_ones():
    parts = {"bound": 0.6, "gpu_overheads": 0.2, "imbalance": 0.004, "transfers": 0.05, "serialisation": 0.146}
    assert largest_losses(parts, 4, 0.005) == [("gpu_overheads", 0.2), ("serialisation", 0.146), ("transfers", 0.05)]
    assert largest_losses(parts, 1) == [("gpu_overheads", 0.2)]


def _timing(durations, bound=0.5) -> IterationTiming:
    d = np.asarray(durations, float)
    return IterationTiming(d, {"gpu": d}, bound=bound * d)


def test_steady_state_throughput_of_a_hand_built_timeline():
    m = Metrics(("gpu",), timeline_plans=0)
    m.record(0, 0.0, Plan(decode_ids=np.arange(4), steps=10), _timing(np.ones(10)))  # 40 tokens over [0, 10]
    m.record(0, 10.0, Plan(decode_ids=np.arange(2), steps=5), _timing(np.full(5, 2.0)))  # 10 tokens over [10, 20]
    # 50 tokens: 10% (5) at 5/4 s, 50% (25) at 25/4 s, 90% (45) at 10 + 5/1 s
    assert np.allclose(m.output_times([0.1, 0.5, 0.9]), [1.25, 6.25, 15.0])
    assert m.steady_throughput() == pytest.approx(40 / (15.0 - 1.25))
    assert m.steady_bound_s() == pytest.approx(0.5 * (15.0 - 1.25))  # every step's bound is half its duration
    # two replicas at once: 100 tokens over [0, 10] and 100 over [0, 5]; 10% = 20 tokens at 30 tok/s
    t = output_times(np.zeros(2), np.array([10.0, 5.0]), np.array([100.0, 100.0]), [0.1, 0.5, 0.9])
    assert np.allclose(t, [20 / 30, 100 / 30, 5 + 30 / 10])


def test_rejecting_systems_get_no_ratio_and_compare_reruns_the_common_requests(tmp_path):
    small, big = tmp_path / "small.toml", tmp_path / "big.toml"
    for path, reserve in ((small, 0.83), (big, 0.5)):
        path.write_text(f'name = "{path.stem}"\nkind = "gpu-only"\nparallelism = {{ tp = 1, dp = 1 }}\n'
                        f'[gpu]\npreset = "a100-80gb"\ncount = 1\nmemory_reserve_fraction = {reserve}\n')
    trace = tmp_path / "trace.csv"
    t0 = "2023-11-16 18:15:46.6805900"
    rows = [(t0, 64, 300)] * 6 + [(t0, 64, 20000)] * 2  # the last two need more KV than `small` holds
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(f"{a},{p},{o}\n" for a, p, o in rows))
    res = compare([str(small), str(big)], "llama-2-7b", str(trace), None, mode="offline", jobs=1)
    by = {r["system"]: r for r in res}
    assert by["small"]["requests_rejected"] == 2 and by["big"]["requests_rejected"] == 0
    assert by["small"]["speedup"] is None and by["big"]["speedup"] is None  # different request sets: no ratio
    assert by["small"]["common_requests"] == by["big"]["common_requests"] == 6
    assert by["small"]["common_speedup"] == 1.0 and by["big"]["common_speedup"] is not None
    assert ratio_cell(by["small"], by["big"]) == "OOM (2 rejected)"
    assert ratio_cell(by["big"], by["small"]).endswith("tok/s") and "x" not in ratio_cell(by["big"], by["small"])
    assert ratio_cell(by["big"], by["big"]) == "1.00x / 1.00x"


def test_a_study_simulates_a_run_once_when_the_probe_picks_the_papers_parallelism():
    from l3.report.study import Run, execute_all

    runs = [Run(v, "gpu-only", "gpt-175b", "fixed:200:20", 6, parallel=v) for v in ("paper", "auto")]
    paper, auto = execute_all(runs, jobs=1)  # GPT-175B fits 8 A100s only at TP8: both views run TP8 x DP1
    assert (paper["parallelism"]["rule"], auto["parallelism"]["rule"]) == ("paper", "auto")
    assert auto["parallelism_candidates"][-1]["status"].startswith("chosen")
    assert paper["wall_time_s"] == auto["wall_time_s"]  # one simulation, reported twice
    assert paper["throughput_tok_s"] == auto["throughput_tok_s"] > 0


def _pid_after(seconds: float) -> tuple[float, int]:
    time.sleep(seconds)
    return seconds, os.getpid()


def test_the_process_map_shares_items_between_this_process_and_its_workers():
    """`process_map(2)`: results in item order; this process runs the first item and, while the worker is busy,
    takes items from the back; an item's error reaches the caller. (The worker cannot reach the last item before
    this process is done with the first: items 1-6 take it 1.2 s, the first 0.6 s.)"""
    items = [0.6, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.3]
    with process_map(2) as mapper:
        out = mapper(_pid_after, items)
        assert [s for s, _ in out] == items
        here = {i for i, (_, pid) in enumerate(out) if pid == os.getpid()}
        assert 0 in here and len(here) < len(items) and 7 in here  # the last, longest left, is taken back here
        with pytest.raises(ValueError):
            mapper(_pid_after, [0.0, -1.0])
