"""The simulating executor: advances every replica's clock with its system's timing model.

Replicas share one arrival stream and one waiting queue. The replica with the earliest clock always acts
next, so a request is only ever taken by a replica whose clock has reached its arrival. Runs of decode-only
iterations with an unchanged batch are advanced in one vectorised step (see `ContinuousBatchingScheduler.
repeat_limit`), stopping at the first finish, memory limit or admissible arrival.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from l3.sched import build_scheduler
from l3.sched.requests import RequestTable, WaitingQueue
from l3.sched.scheduler import ContinuousBatchingScheduler
from l3.sched.timing import IterationTiming
from l3.sim.metrics import Metrics
from l3.specs.system import Deployment
from l3.systems import SystemModel, build_system
from l3.workload import Workload

MAX_BULK_STEPS = 1 << 16  # cap on one vectorised run (bounds temporary arrays)


@dataclass
class SimResult:
    deployment: Deployment
    workload: Workload
    system: SystemModel
    table: RequestTable
    metrics: Metrics
    schedulers: list[ContinuousBatchingScheduler]
    simulated_time_s: float  # the run's end (with `until_output`: the last replica clock when it stopped)
    wall_time_s: float
    output_total: float  # output tokens of the requests not rejected (what the whole run puts out)


class Simulator:
    def __init__(self, dep: Deployment, workload: Workload, timeline_plans: int = 8, bulk: bool = True):
        """`bulk=False` executes every iteration singly (same results, slower; used to check the bulk path).
        `timeline_plans`: at most this many iterations keep their device intervals (metrics.TimelineSample)."""
        self.dep, self.workload = dep, workload
        self.max_bulk = MAX_BULK_STEPS if bulk else 1
        self.system = build_system(dep)
        self.table = RequestTable()  # requests enter as they arrive
        self.queue = WaitingQueue(self.table)
        topology = self.system.topology()
        self.schedulers = [build_scheduler(dep.system, dep.model, topology, self.table, self.queue, r)
                           for r in range(self.system.replicas)]  # fmt: skip
        self.metrics = Metrics(self.system.devices, timeline_plans)
        self.completed = 0  # requests finished so far (for progress reports)
        self._arrived = 0  # workload requests added to the table so far (the table's ids are the workload's)

    def _release(self, now: float) -> None:
        """Add the workload's requests that have arrived by `now` (the schedulers reject what they never can
        serve and queue the rest)."""
        w = self.workload
        end = int(np.searchsorted(w.arrival_s, now, side="right"))
        if end > self._arrived:
            a = self._arrived
            ids = self.table.add(w.arrival_s[a:end], w.prompt_len[a:end], w.output_len[a:end])
            self.schedulers[0].add(ids)
            self._arrived = end

    def _next_arrival(self) -> float:
        return float(self.workload.arrival_s[self._arrived]) if self._arrived < len(self.workload) else np.inf

    def run(self, progress: Callable[[int], None] | None = None, until_output: float | None = None) -> SimResult:
        """Serve the workload. `until_output` (a fraction, 0-1]: stop once the time that fraction of the run's
        output is out is settled (every plan that starts before it has run; the output is that of every request
        not rejected, known once all have arrived): the figures up to that time are the whole run's, those
        after it are missing (`SimResult.output_total` says what the whole run puts out)."""
        wall0 = time.perf_counter()
        clocks = [(0.0, r) for r in range(len(self.schedulers))]
        heapq.heapify(clocks)
        end = 0.0
        done_before = 0
        while clocks:
            now, r = heapq.heappop(clocks)
            nxt = self._act(r, now)
            if nxt is None:
                end = max(end, now)
                continue
            heapq.heappush(clocks, (nxt, r))
            if progress is not None and self.completed != done_before:
                done_before = self.completed
                progress(done_before + len(self.table.reject_reason))
            if until_output is not None and self._settled(until_output, clocks[0][0]):
                end = max(c for c, _ in clocks)
                break
        return SimResult(self.dep, self.workload, self.system, self.table, self.metrics, self.schedulers, end,
                         time.perf_counter() - wall0, self._output_total())  # fmt: skip

    def _output_total(self) -> float:
        """Output tokens of the workload's requests not rejected (all of them once the run is done)."""
        rejected = np.fromiter(self.table.reject_reason, np.int64, len(self.table.reject_reason))
        return float(self.workload.output_len.sum() - self.workload.output_len[rejected].sum())

    def _settled(self, fraction: float, earliest: float) -> bool:
        """Whether the time `fraction` of the output is out is known: every request has arrived, the plans run
        so far reach it, and no replica may still start a plan before it (`earliest`: the earliest clock)."""
        if self._arrived < len(self.workload):
            return False
        total = self._output_total()
        return self.metrics.output_tokens >= fraction * total and bool(
            self.metrics.output_times(fraction, total)[0] <= earliest)

    def _act(self, r: int, now: float) -> float | None:
        """Let replica r act at time `now`; returns its next clock, or None when it has nothing left."""
        sched, table, queue = self.schedulers[r], self.table, self.queue
        self._release(now)
        plan = sched.schedule(now)
        if plan.empty:
            # Cannot happen: an idle replica always fits the head of the queue (oversized requests are rejected).
            if len(queue):
                raise RuntimeError(f"replica {r} idle at t={now:.6f}s with {len(queue)} requests waiting")
            nxt = self._next_arrival()
            return max(nxt, now) if nxt < np.inf else None
        steps = 1
        if plan.decode_only:
            lim = sched.repeat_limit(plan)
            steps = min(lim.steps, self.max_bulk)
        # The timeline keeps device intervals of a sample of the single-step iterations that decode.
        record = steps == 1 and len(plan.decode_ids) > 0 and self.metrics.sample.wants()
        timing = self.system.run(plan, table, steps, record=record)
        if steps > 1 and lim.arrival_sensitive and self._next_arrival() < np.inf:
            ends = np.cumsum(timing.durations)
            steps = min(steps, int(np.searchsorted(ends, self._next_arrival() - now, side="left")) + 1)
            timing = truncate(timing, steps)
        plan.steps = steps
        duration = timing.duration
        self.metrics.record(r, now, plan, timing)
        self.metrics.hold(sched.kv.tier_used, duration)  # held during the plan: what it needed at its start
        sched.observe(plan, timing)
        self.completed += len(sched.commit(plan, now + duration))
        return now + duration


def truncate(t: IterationTiming, steps: int) -> IterationTiming:
    """The first `steps` steps of a multi-step timing."""

    def cut(x):
        return None if x is None else x[:steps]

    return IterationTiming(t.durations[:steps], {d: b[:steps] for d, b in t.busy.items()}, cut(t.sub_gpu_s),
                           cut(t.sub_mem_s), {k: v[:steps] for k, v in t.stats.items()}, bound=cut(t.bound),
                           losses={k: v[:steps] for k, v in t.losses.items()},
                           energy={k: v[:steps] for k, v in t.energy.items()})  # fmt: skip
