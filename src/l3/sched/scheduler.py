"""Continuous batching with chunked prefill for one replica (vLLM/Sarathi-style policy).

The scheduler sees only the request table, the waiting queue and its KV pool; it never sees the clock's
mechanics or a cost model, so the same code can drive a simulator or a real engine.

Policy (docs/memory-policy.md):
- Admission: FIFO from the waiting queue while the head's prefill KV fits a KV tier (`choose_tier`; most
  systems have one) with `watermark` of that tier kept free, the batch is under `max_batch_size`, and pending
  prefill work is under the iteration's token budget.
- Each iteration runs one decode token for every request past its prefill, and fills the remaining token
  budget (`max_batched_tokens` - decodes) with prefill chunks in admission order.
- Memory exhaustion during decode: the most recently admitted running request of the full tier is preempted
  (its KV freed, re-queued at the front; it later re-prefills prompt + generated tokens). Requests are never
  dropped.
- A request whose prompt + output KV can never fit a replica is rejected with a reason when it arrives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from l3.sched.kv import KvPool
from l3.sched.plan import Plan
from l3.sched.requests import RequestTable, Status, WaitingQueue
from l3.sched.timing import IterationTiming
from l3.specs.model import ModelSpec
from l3.specs.system import SchedulerSpec


@dataclass(frozen=True)
class RepeatLimit:
    """How many times a decode-only plan may repeat, and whether an arrival would change the decision."""

    steps: int
    arrival_sensitive: bool


class ContinuousBatchingScheduler:
    def __init__(self, spec: SchedulerSpec, kv: KvPool, table: RequestTable, queue: WaitingQueue, replica: int,
                 model: ModelSpec):  # fmt: skip
        self.spec, self.kv, self.table, self.queue, self.replica = spec, kv, table, queue, replica
        self.model = model
        self.running = np.empty(0, np.int64)  # admission order
        self._watermark_blocks = np.ceil(spec.watermark * kv.tier_capacity).astype(np.int64)  # per tier

    # --- arrivals -----------------------------------------------------------------------------------
    def add(self, ids: np.ndarray) -> None:
        """Take newly arrived requests (already in the table): reject, with a reason, those no replica like this
        one can ever serve (beyond the model's context window, or more KV than a replica holds), and queue the
        rest. The queue may be shared by several alike replicas; any of their schedulers can take arrivals."""
        t = self.table
        ids = np.asarray(ids, np.int64)
        need = t.prompt[ids] + t.output[ids]
        window, limit = self.model.max_context, self.max_request_tokens()
        for i in np.flatnonzero(self.unservable(need)):  # only the requests rejected
            rid, n = int(ids[i]), int(need[i])
            if window is not None and n > window:
                t.reject(rid, "exceeds_context_window", f"needs {n} tokens; {self.model.name} attends at most "
                                                        f"{window}")  # fmt: skip
            else:
                t.reject(rid, "kv_exceeds_capacity", f"needs {n} tokens of KV; a replica holds at most {limit}")
        self.queue.add(ids[t.status[ids] != Status.REJECTED])

    def unservable(self, need: np.ndarray) -> np.ndarray:
        """Which requests of `need` tokens (prompt + output) `add` would reject."""
        need = np.asarray(need, np.int64)
        window = self.model.max_context
        return (need > window if window is not None else False) | (need > self.max_request_tokens())

    def abort(self, rid: int, now: float) -> bool:
        """Withdraw a waiting or running request (its client went away) between iterations: out of the queue or
        the batch, its KV freed. False if it had already ended."""
        t = self.table
        if t.status[rid] == Status.WAITING:
            self.queue.remove(rid)
        elif t.status[rid] == Status.RUNNING:
            self.running = self.running[self.running != rid]
            self.kv.free(int(t.kv_blocks[rid]), int(t.kv_tier[rid]))
            t.kv_blocks[rid] = 0
        else:
            return False
        t.status[rid] = Status.ABORTED
        t.finish_s[rid] = now
        return True

    # --- admission control ------------------------------------------------------------------------
    def max_request_tokens(self) -> int:
        """Largest prompt + output a request may have and still fit this replica alone."""
        return int((self.kv.tier_capacity - self._watermark_blocks).max()) * self.kv.block_size

    def _batch_full(self, admitting: int = 0) -> bool:
        """The batch holds `max_batch_size` requests, counting `admitting` ones not yet running."""
        return 0 < self.spec.max_batch_size <= len(self.running) + admitting

    def _fits(self, rid: int, tier: int) -> bool:
        need = int(self.kv.blocks(self.table.prefill_target[rid]))
        return need + int(self._watermark_blocks[tier]) <= self.kv.free_in(tier)

    def _head_tier(self, admitting: int = 0) -> int | None:
        """The tier the head of the queue would be admitted to now (with `admitting` requests admitted before it
        in this round), or None if it cannot be admitted."""
        rid = self.queue.peek()
        if rid is None or self._batch_full(admitting):
            return None
        return self.choose_tier(rid)

    def _head_fits(self) -> bool:
        return self._head_tier() is not None

    def _admit(self, now: float) -> None:
        t = self.table
        pending = int((t.prefill_target[self.running] - t.prefilled[self.running]).sum())
        budget = self.admission_budget()
        admitted = []
        while pending < budget and (tier := self._head_tier(len(admitted))) is not None:
            rid = self.queue.pop()
            blocks = int(self.kv.blocks(t.prefill_target[rid]))
            self.kv.allocate(blocks, tier)
            t.kv_blocks[rid] = blocks
            t.kv_tier[rid] = tier
            t.status[rid] = Status.RUNNING
            t.replica[rid] = self.replica
            if np.isnan(t.admitted_s[rid]):
                t.admitted_s[rid] = now
            pending += int(t.prefill_target[rid] - t.prefilled[rid])
            admitted.append(rid)
        if admitted:
            ids = np.asarray(admitted, np.int64)
            self.on_admit(ids)
            self.running = np.concatenate([self.running, ids])

    def _preempt_last(self, tier: int) -> None:
        """Preempt the most recently admitted running request whose KV is in `tier`."""
        t = self.table
        k = int(np.flatnonzero(t.kv_tier[self.running] == tier)[-1])
        rid = int(self.running[k])
        self.running = np.delete(self.running, k)
        self.kv.free(int(t.kv_blocks[rid]), tier)
        t.kv_blocks[rid] = 0
        t.prefilled[rid] = 0
        t.prefill_target[rid] = t.prompt[rid] + t.generated[rid]
        t.preemptions[rid] += 1
        t.sub_batch[rid] = -1
        self.queue.push_front(rid)

    def _decode_growth_blocks(self, ids: np.ndarray) -> np.ndarray:
        """Extra blocks each decoding request needs to write one more token."""
        t = self.table
        return self.kv.blocks(t.prompt[ids] + t.generated[ids]) - t.kv_blocks[ids]

    # --- the per-iteration decision ---------------------------------------------------------------
    def schedule(self, now: float) -> Plan:
        t = self.table
        self._admit(now)
        run, in_decode = self._fit_decodes()
        if not len(run):  # everything was preempted: start again from the head of the queue
            self._admit(now)
            run, in_decode = self._fit_decodes()
        decode_ids = run[in_decode]
        prefill_ids = run[~in_decode]
        budget = self.prefill_budget(decode_ids)
        remaining = t.prefill_target[prefill_ids] - t.prefilled[prefill_ids]
        before = np.cumsum(remaining) - remaining
        chunks = np.clip(budget - before, 0, remaining).astype(np.int64)
        take = chunks > 0
        prefill_ids, chunks = prefill_ids[take], chunks[take]
        prefix = t.prefilled[prefill_ids]
        plan = Plan(decode_ids=decode_ids, prefill_ids=prefill_ids, prefill_chunks=chunks, prefill_prefix=prefix,
                    prefill_completes=prefix + chunks >= t.prefill_target[prefill_ids])  # fmt: skip
        return self.split(plan)

    def _fit_decodes(self) -> tuple[np.ndarray, np.ndarray]:
        """Preempt until every decoding request's next token fits its tier; returns (running, in decode)."""
        t = self.table
        while True:
            run = self.running
            in_decode = t.prefilled[run] >= t.prefill_target[run]
            decode_ids = run[in_decode]
            growth = self.kv.per_tier(t.kv_tier[decode_ids], self._decode_growth_blocks(decode_ids))
            over = np.flatnonzero(growth > self.kv.tier_capacity - self.kv.tier_used)
            if not len(over):
                return run, in_decode
            self._preempt_last(int(over[0]))

    # --- hooks for policies that extend this one -----------------------------------------------------
    def admission_budget(self) -> float:
        """Admit while the prefill work already admitted is below this many tokens."""
        return self.spec.max_batched_tokens

    def prefill_budget(self, decode_ids: np.ndarray) -> float:
        """Prefill tokens this iteration: what the token budget leaves after one token per decode."""
        return max(self.spec.max_batched_tokens - len(decode_ids), 0)

    def choose_tier(self, rid: int) -> int | None:
        """The KV tier to admit request `rid` to (the first with room), or None to keep it waiting."""
        return next((k for k in range(self.kv.tiers) if self._fits(rid, k)), None)

    def on_admit(self, ids: np.ndarray) -> None:
        """Called with newly admitted requests (e.g. to place their KV)."""

    def split(self, plan: Plan) -> Plan:
        """Divide the plan into sub-batches (this policy runs one batch)."""
        return plan

    def repeat_limit(self, plan: Plan) -> RepeatLimit:
        """Steps a decode-only plan can repeat with no scheduling decision in between.

        It stops at the first step where a request finishes or memory would run out. Arrivals matter only
        if the queue is empty now (a non-empty queue stays blocked: memory only shrinks while decoding).
        """
        t = self.table
        ids = plan.decode_ids
        steps = int((t.output[ids] - t.generated[ids]).min())
        stored = t.prompt[ids] + t.generated[ids] - 1
        steps = max(1, self.kv.growth_steps(stored, t.kv_tier[ids], steps))
        sensitive = len(self.queue) == 0 and not self._batch_full()
        return RepeatLimit(steps, sensitive)

    def observe(self, plan: Plan, timing: IterationTiming) -> None:
        """Times the executor measured for `plan` (this policy does not learn from them)."""

    def report(self) -> dict:
        """Policy-specific figures for the run summary."""
        return {}

    def keep_recent(self, window: int) -> None:
        """Keep only the last `window` entries of what is logged per iteration (a long-running executor, e.g. a
        server; this policy logs nothing)."""

    def cap_learning_time(self, share: float) -> None:
        """Learning takes at most `share` of the wall time (an executor whose time is real; this policy does
        not learn)."""

    def commit(self, plan: Plan, end_s: float) -> np.ndarray:
        """Apply a finished plan (all its steps); returns the ids of requests that completed."""
        t = self.table
        d = plan.decode_ids
        if len(d):
            t.generated[d] += plan.steps
            need = self.kv.blocks(t.prompt[d] + t.generated[d] - 1)
            for tier, n in enumerate(self.kv.per_tier(t.kv_tier[d], need - t.kv_blocks[d])):
                self.kv.allocate(int(n), tier)
            t.kv_blocks[d] = need
        p = plan.prefill_ids
        if len(p):
            t.prefilled[p] += plan.prefill_chunks
            done = p[plan.prefill_completes]
            t.generated[done] += 1
            first = done[np.isnan(t.first_token_s[done])]
            t.first_token_s[first] = end_s
        run = self.running
        finished = run[t.generated[run] >= t.output[run]]
        if len(finished):
            for tier, n in enumerate(self.kv.per_tier(t.kv_tier[finished], t.kv_blocks[finished])):
                self.kv.free(int(n), tier)
            t.kv_blocks[finished] = 0
            t.status[finished] = Status.DONE
            t.finish_s[finished] = end_s
            self.running = run[t.generated[run] < t.output[run]]
        return finished
