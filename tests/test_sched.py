"""The scheduler package on its own: driven by a stub executor (no simulator, no system model), requests added
as they arrive, and the policy registry."""

from __future__ import annotations

import typing

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l3.sched import Topology, build_scheduler
from l3.sched.kv import DEVICE_TIER
from l3.sched.policies import POLICIES
from l3.sched.requests import RequestTable, Status, WaitingQueue
from l3.sched.subbatch import SubBatchScheduler
from l3.sched.timing import IterationTiming
from l3.specs.model import get_model
from l3.specs.system import CoordinationSpec, get_system, with_overrides

LLAMA = get_model("llama-2-7b")


def stub_timing(plan, table) -> IterationTiming:
    """A made-up executor: each sub-batch's GPU time is linear in its tokens, its memory-side time linear in the
    tokens it attends (what the predictors should learn exactly)."""
    gpu, mem = np.zeros((1, 2)), np.zeros((1, 2))
    for x in (0, 1):
        sb = plan.sub_batch(x)
        gpu[0, x] = 1e-3 + 2e-5 * (len(sb.decode_ids) + sb.prefill_chunks.sum())
        mem[0, x] = 1e-7 * table.context(sb.decode_ids).sum()
    d = np.array([gpu.sum() + mem.max()])
    return IterationTiming(d, {"gpu": d}, sub_gpu_s=gpu, sub_mem_s=mem)


def drive(sched, table, arrivals, prompt, output, max_iters=100_000, check=None):
    """Add requests as the stub clock reaches their arrival; schedule, run, observe, commit until all are done.
    `check(plan)` sees every plan as the scheduler made it."""
    now, nxt, iters = 0.0, 0, 0
    while iters < max_iters:
        end = int(np.searchsorted(arrivals, now, side="right"))
        if end > nxt:
            sched.add(table.add(arrivals[nxt:end], prompt[nxt:end], output[nxt:end]))
            nxt = end
        plan = sched.schedule(now)
        if plan.empty:
            if nxt == len(arrivals):
                return iters
            now = float(arrivals[nxt])
            continue
        if check is not None:
            check(plan)
        timing = stub_timing(plan, table)
        sched.observe(plan, timing)
        now += timing.duration
        sched.commit(plan, now)
        iters += 1
    raise AssertionError("did not finish")


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 30), st.sampled_from(["gpu-only", "l3"]), st.integers(0, 2**32 - 1))
def test_a_stub_executor_drives_the_scheduler_to_completion(n, system, seed):
    rng = np.random.default_rng(seed)
    arrivals = np.sort(rng.uniform(0, 0.5, n))
    prompt, output = rng.integers(1, 3000, n), rng.integers(1, 400, n)
    table = RequestTable()
    topo = Topology(kv_tiers=(8192,)) if system == "gpu-only" else Topology(kv_tiers=(8192,), slots=4)
    sched = build_scheduler(get_system(system), LLAMA, topo, table, WaitingQueue(table))
    assert isinstance(sched, SubBatchScheduler) == (system == "l3")
    drive(sched, table, arrivals, prompt, output)
    assert table.n == n  # every request entered, as it arrived
    done = table.status == Status.DONE
    rejected = table.status == Status.REJECTED
    assert (done | rejected).all()
    assert (rejected == (prompt + output > sched.max_request_tokens())).all()
    assert (table.generated[done] == output[done]).all() and (table.finish_s[done] >= arrivals[done]).all()
    assert sched.kv.used_blocks == 0


@settings(max_examples=8, deadline=None)
@given(st.integers(1, 30), st.sampled_from(["gpu-only", "l3", "l3-plus"]), st.integers(0, 2**32 - 1))
def test_each_plan_says_where_attention_runs_and_what_crosses_the_link(n, system, seed):
    """GPU-only plans attend everything on the GPUs; L3 plans everything on the device; under an HBM tier
    (l3-plus) each request where its KV is, and the device's requests form sub-batch 1. The link carries each
    device decode's Q, K, V and output and each device prefill chunk's K and V, nothing of the rest."""
    rng = np.random.default_rng(seed)
    arrivals, prompt, output = np.sort(rng.uniform(0, 0.5, n)), rng.integers(1, 3000, n), rng.integers(1, 400, n)
    table = RequestTable()
    spec = get_system(system)
    if system == "l3-plus":
        spec = with_overrides(spec, {"coordination": {"asymmetric": True}})
    tiers = {"gpu-only": (8192,), "l3": (8192,), "l3-plus": (2048, 8192)}[system]
    sched = build_scheduler(spec, LLAMA, Topology(kv_tiers=tiers, slots=None if system == "gpu-only" else 4), table,
                            WaitingQueue(table))  # fmt: skip

    def check(plan):
        if system == "gpu-only":
            expect, pre = np.zeros(len(plan.decode_ids), bool), np.zeros(len(plan.prefill_ids), bool)
        elif system == "l3":
            expect, pre = np.ones(len(plan.decode_ids), bool), np.ones(len(plan.prefill_ids), bool)
        else:
            expect, pre = (table.kv_tier[ids] == DEVICE_TIER for ids in (plan.decode_ids, plan.prefill_ids))
            if not sched._one:  # split by tier (one batch, where it pays, holds both)
                np.testing.assert_array_equal(plan.decode_sub == 1, expect)
        np.testing.assert_array_equal(plan.decode_on_device, expect)
        np.testing.assert_array_equal(plan.prefill_on_device, pre)
        link = plan.link()
        assert link.decodes == expect.sum() and link.prefill_kv_tokens == plan.prefill_chunks[pre].sum()

    drive(sched, table, arrivals, prompt, output, check=check)
    assert ((table.status == Status.DONE) | (table.status == Status.REJECTED)).all()


@pytest.mark.parametrize("system", ["l3", "l3-plus"])
def test_an_executor_that_cannot_overlap_gets_one_batch_per_iteration(system):
    """An executor that runs a plan's sub-batches one after the other (`Topology.overlap` False) gets every
    iteration as one batch, under both tier settings, and the predictors still learn its times."""
    rng = np.random.default_rng(1)
    n = 40
    table = RequestTable()
    spec = get_system(system)
    if system == "l3-plus":
        spec = with_overrides(spec, {"coordination": {"asymmetric": True}})
    tiers = (2048, 8192) if system == "l3-plus" else (8192,)
    sched = build_scheduler(spec, LLAMA, Topology(kv_tiers=tiers, slots=4, overlap=False), table,
                            WaitingQueue(table))  # fmt: skip
    plans = []
    iters = drive(sched, table, np.sort(rng.uniform(0, 0.5, n)), rng.integers(1, 3000, n), rng.integers(1, 400, n),
                  check=lambda plan: plans.append((plan.decode_sub.copy(), plan.prefill_sub.copy())))  # fmt: skip
    assert iters == len(plans) > 0 and sched.single_batch > 0
    assert not any(d.any() or p.any() for d, p in plans)
    assert sched.gpu_pred.seen >= iters and (table.status == Status.DONE).all()


def test_predictors_learn_a_linear_executor_exactly():
    rng = np.random.default_rng(0)
    n = 64
    table = RequestTable()
    sched = build_scheduler(get_system("l3"), LLAMA, Topology(kv_tiers=(10**6,), slots=8), table,
                            WaitingQueue(table))  # fmt: skip
    drive(sched, table, np.zeros(n), rng.integers(100, 2000, n), rng.integers(50, 300, n))
    pim = sched.report()["pim_predictor_error"]
    assert pim["median"] < 0.01  # the memory-side stub is linear in the features the PIM predictor uses


def test_requests_are_added_as_they_arrive_and_the_unservable_rejected_with_a_reason():
    table = RequestTable()
    queue = WaitingQueue(table)
    model = LLAMA.model_copy(update={"max_context": 4096})
    sched = build_scheduler(get_system("gpu-only"), model, Topology(kv_tiers=(2048,)), table, queue)
    assert table.n == 0
    ids = table.add([0.0, 0.0, 1.0], [100, 3000, 10], [10, 10, 5000])
    sched.add(ids)
    assert list(queue._q) == [0] and table.status[0] == Status.WAITING
    assert table.reject_code == {1: "kv_exceeds_capacity", 2: "exceeds_context_window"}
    more = table.add(np.full(40, 2.0), np.full(40, 7), np.full(40, 3))  # the buffers grow; ids continue
    assert more.tolist() == list(range(3, 43)) and table.prompt[3:].tolist() == [7] * 40
    assert np.isnan(table.first_token_s[more]).all() and (table.placement[more] == -1).all()


def test_every_policy_a_system_file_can_name_is_registered():
    names = typing.get_args(CoordinationSpec.model_fields["policy"].annotation)
    assert set(names) == set(POLICIES)
    for name in names:
        table = RequestTable()
        spec = get_system("l3").model_copy(update={"coordination": CoordinationSpec(policy=name)})
        sched = build_scheduler(spec, LLAMA, Topology(kv_tiers=(10**5,), slots=2), table, WaitingQueue(table))
        assert sched.policy.name == name and sched.learning == (name == "alignment")


@pytest.mark.parametrize("policy", ["fill-capacity", "halving"])
def test_policies_pace_admission_as_named(policy):
    table = RequestTable()
    spec = get_system("l3").model_copy(update={"coordination": CoordinationSpec(policy=policy)})
    sched = build_scheduler(spec, LLAMA, Topology(kv_tiers=(10**6,), slots=2), table, WaitingQueue(table))
    sched.add(table.add(np.zeros(20), np.full(20, 1000), np.full(20, 10)))
    plan = sched.schedule(0.0)
    budget = spec.scheduler.max_batched_tokens
    assert (int(plan.prefill_chunks.sum()) == 20_000) == (policy == "fill-capacity")
    if policy == "halving":
        assert plan.prefill_chunks.sum() <= budget
