"""Per-request state as columns (struct of arrays), shared by the scheduler and the executors.

Token accounting: a request has `prompt` tokens and wants `output` tokens. `generated` counts output tokens
produced so far; the step that completes a prefill produces one token. A decode step of a request with
`generated = g` reads its last token and attends over `prompt + g` tokens (that token's KV is written in the
step). After a preemption the request re-prefills `prompt + generated` tokens (recomputation).
"""

from __future__ import annotations

from collections import deque
from enum import IntEnum

import numpy as np


class Status(IntEnum):
    PENDING = 0  # not yet arrived
    WAITING = 1  # arrived, not admitted (or preempted)
    RUNNING = 2
    DONE = 3
    REJECTED = 4


class RequestTable:
    """Columns indexed by request id (0..n-1, ids in arrival order)."""

    def __init__(self, arrival_s: np.ndarray, prompt: np.ndarray, output: np.ndarray):
        n = len(arrival_s)
        self.n = n
        self.arrival = np.asarray(arrival_s, dtype=np.float64)
        self.prompt = np.asarray(prompt, dtype=np.int64)
        self.output = np.asarray(output, dtype=np.int64)
        self.generated = np.zeros(n, np.int64)
        self.prefilled = np.zeros(n, np.int64)  # tokens of the current prefill target already processed
        self.prefill_target = self.prompt.copy()  # prompt (+ generated, after a preemption)
        self.first_token_s = np.full(n, np.nan)
        self.finish_s = np.full(n, np.nan)
        self.admitted_s = np.full(n, np.nan)
        self.status = np.zeros(n, np.int8)
        self.replica = np.full(n, -1, np.int32)
        self.preemptions = np.zeros(n, np.int32)
        self.kv_blocks = np.zeros(n, np.int64)  # KV blocks held now
        self.kv_tier = np.zeros(n, np.int8)  # KV memory tier of those blocks (see KvPool)
        self.placement = np.full(n, -1, np.int32)  # memory-side position (e.g. PIM channel) chosen at admission
        self.sub_batch = np.full(n, -1, np.int8)  # sub-batch a decoding request runs in (-1: none yet)
        self.reject_reason: dict[int, str] = {}  # id -> full reason
        self.reject_code: dict[int, str] = {}  # id -> short reason code

    def context(self, ids: np.ndarray) -> np.ndarray:
        """Tokens attended by the next decode step of each request."""
        return self.prompt[ids] + self.generated[ids]

    def reject(self, rid: int, code: str, detail: str) -> None:
        self.status[rid] = Status.REJECTED
        self.reject_code[rid] = code
        self.reject_reason[rid] = f"{code}: {detail}"


class WaitingQueue:
    """Requests that have arrived and wait for admission, FIFO; preempted requests go back to the front."""

    def __init__(self, table: RequestTable):
        self.table = table
        self._next = 0  # next request id to arrive
        self._q: deque[int] = deque()

    def release_arrivals(self, now: float) -> None:
        """Move requests with arrival <= now into the queue."""
        end = int(np.searchsorted(self.table.arrival, now, side="right"))
        if end > self._next:
            ids = np.arange(self._next, end)
            ids = ids[self.table.status[ids] == Status.PENDING]  # rejected requests never queue
            self.table.status[ids] = Status.WAITING
            self._q.extend(ids.tolist())
            self._next = end

    def next_arrival(self) -> float:
        return float(self.table.arrival[self._next]) if self._next < self.table.n else np.inf

    def peek(self) -> int | None:
        return self._q[0] if self._q else None

    def pop(self) -> int:
        return self._q.popleft()

    def push_front(self, rid: int) -> None:
        self.table.status[rid] = Status.WAITING
        self._q.appendleft(rid)

    def __len__(self) -> int:
        return len(self._q)

    @property
    def exhausted(self) -> bool:
        return not self._q and self._next >= self.table.n
