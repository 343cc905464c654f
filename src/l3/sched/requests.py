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
    PENDING = 0  # added, not yet queued (or rejected)
    WAITING = 1  # arrived, not admitted (or preempted)
    RUNNING = 2
    DONE = 3
    REJECTED = 4
    ABORTED = 5  # withdrawn by its client (engine only)


# Columns of the request table: name -> (dtype, value of a newly added request). `prefill_target` starts at the
# prompt; `arrival`, `prompt` and `output` are given at `add`.
_COLUMNS = {
    "arrival": (np.float64, 0.0),
    "prompt": (np.int64, 0),
    "output": (np.int64, 0),
    "generated": (np.int64, 0),
    "prefilled": (np.int64, 0),  # tokens of the current prefill target already processed
    "prefill_target": (np.int64, 0),  # prompt (+ generated, after a preemption)
    "first_token_s": (np.float64, np.nan),
    "finish_s": (np.float64, np.nan),
    "admitted_s": (np.float64, np.nan),
    "status": (np.int8, Status.PENDING),
    "replica": (np.int32, -1),
    "preemptions": (np.int32, 0),
    "kv_blocks": (np.int64, 0),  # KV blocks held now
    "kv_tier": (np.int8, 0),  # KV memory tier of those blocks (see KvPool)
    "placement": (np.int32, -1),  # memory-side position (e.g. PIM channel) chosen at admission
    "sub_batch": (np.int8, -1),  # sub-batch a decoding request runs in (-1: none yet)
    # A striped request's slots in stripe order, -1 where not yet decided (`set_stripe_width`; no columns until
    # then): where a memory-side device decides each new chunk's slot as the request grows.
    "stripe": (np.int32, -1),
}


class RequestTable:
    """Columns indexed by request id (0..n-1, in the order requests were added). Requests are added as they
    arrive (`add`); each column attribute is a view of the first n entries of a buffer that doubles when full."""

    def __init__(self, arrival_s=(), prompt=(), output=()):
        self.n = 0
        self._buf = {name: np.empty((0, 0) if name == "stripe" else 0, dtype)
                     for name, (dtype, _) in _COLUMNS.items()}  # fmt: skip
        self.reject_reason: dict[int, str] = {}  # id -> full reason
        self.reject_code: dict[int, str] = {}  # id -> short reason code
        self._bind()
        if len(arrival_s):
            self.add(arrival_s, prompt, output)

    def _bind(self) -> None:
        for name, buf in self._buf.items():
            setattr(self, name, buf[: self.n])

    def add(self, arrival_s, prompt, output) -> np.ndarray:
        """Append requests (arrival time s, prompt and output tokens; scalars or arrays); returns their ids."""
        arrival = np.atleast_1d(np.asarray(arrival_s, np.float64))
        start, end = self.n, self.n + len(arrival)
        size = len(self._buf["arrival"])
        if end > size:
            size = max(end, 2 * size, 16)
            for name, buf in self._buf.items():
                grown = np.empty((size, *buf.shape[1:]), buf.dtype)
                grown[:start] = buf[:start]
                self._buf[name] = grown
        for name, (_, value) in _COLUMNS.items():
            self._buf[name][start:end] = value
        self._buf["arrival"][start:end] = arrival
        self._buf["prompt"][start:end] = prompt
        self._buf["output"][start:end] = output
        self._buf["prefill_target"][start:end] = prompt
        self.n = end
        self._bind()
        return np.arange(start, end)

    def set_stripe_width(self, width: int) -> None:
        """Give `stripe` `width` columns (the positions of a request's stripe), every slot undecided."""
        now = self._buf["stripe"].shape[1]
        if now == width:
            return
        if now:
            raise ValueError(f"stripe width already {now}, not {width}")
        self._buf["stripe"] = np.full((len(self._buf["arrival"]), width), -1, np.int32)
        self._bind()

    def context(self, ids: np.ndarray) -> np.ndarray:
        """Tokens attended by the next decode step of each request."""
        return self.prompt[ids] + self.generated[ids]

    def reject(self, rid: int, code: str, detail: str) -> None:
        self.status[rid] = Status.REJECTED
        self.reject_code[rid] = code
        self.reject_reason[rid] = f"{code}: {detail}"


class WaitingQueue:
    """Requests that have arrived and wait for admission, FIFO; preempted requests go back to the front. One
    queue may feed several replicas' schedulers."""

    def __init__(self, table: RequestTable):
        self.table = table
        self._q: deque[int] = deque()

    def add(self, ids: np.ndarray) -> None:
        """Queue newly arrived requests at the back, in order."""
        self.table.status[ids] = Status.WAITING
        self._q.extend(np.asarray(ids).tolist())

    def peek(self) -> int | None:
        return self._q[0] if self._q else None

    def pop(self) -> int:
        return self._q.popleft()

    def remove(self, rid: int) -> None:
        self._q.remove(rid)

    def push_front(self, rid: int) -> None:
        self.table.status[rid] = Status.WAITING
        self._q.appendleft(rid)

    def __len__(self) -> int:
        return len(self._q)
