"""An iteration plan (what the scheduler decided) and its shape (what a cost model needs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

_EMPTY = np.empty(0, np.int64)


@dataclass
class Plan:
    """One iteration, or `steps` identical decode-only iterations advanced together.

    decode_ids: requests producing one token each step; prefill_ids / prefill_chunks: prompt tokens processed
    this iteration per prefilling request, after `prefill_prefix` tokens already processed.
    decode_on_device / prefill_on_device: where each request's attention runs, as the scheduler placed its KV:
    True on the memory-side device (PIM, host CPU), False on the GPUs from their HBM (the default). What crosses
    the host link follows (`link`).
    """

    decode_ids: np.ndarray = field(default_factory=lambda: _EMPTY)
    prefill_ids: np.ndarray = field(default_factory=lambda: _EMPTY)
    prefill_chunks: np.ndarray = field(default_factory=lambda: _EMPTY)
    prefill_prefix: np.ndarray = field(default_factory=lambda: _EMPTY)
    prefill_completes: np.ndarray = field(default_factory=lambda: np.empty(0, bool))
    decode_sub: np.ndarray | None = None  # sub-batch (0/1) of each decode request; None = all in sub-batch 0
    prefill_sub: np.ndarray | None = None  # sub-batch of each prefill request
    steps: int = 1
    # Decode requests whose KV moves from the memory-side device into the GPUs' HBM during this (single-step)
    # iteration: they attend from the device now and from HBM from the next iteration on (run-time rebalancing).
    migrate_ids: np.ndarray = field(default_factory=lambda: _EMPTY)
    decode_on_device: np.ndarray | None = None
    prefill_on_device: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.decode_sub is None:
            self.decode_sub = np.zeros(len(self.decode_ids), np.int8)
        if self.prefill_sub is None:
            self.prefill_sub = np.zeros(len(self.prefill_ids), np.int8)
        if self.decode_on_device is None:
            self.decode_on_device = np.zeros(len(self.decode_ids), bool)
        if self.prefill_on_device is None:
            self.prefill_on_device = np.zeros(len(self.prefill_ids), bool)

    def sub_batch(self, s: int) -> Plan:
        """The part of this plan in sub-batch `s`."""
        return self.select(self.decode_sub == s, self.prefill_sub == s)

    def select(self, decodes: np.ndarray, prefills: np.ndarray) -> Plan:
        """The part of this plan with the decode and prefill requests that `decodes` and `prefills` pick (masks or
        indices), as one sub-batch."""
        p = prefills
        return Plan(self.decode_ids[decodes], self.prefill_ids[p], self.prefill_chunks[p], self.prefill_prefix[p],
                    self.prefill_completes[p], steps=self.steps, decode_on_device=self.decode_on_device[decodes],
                    prefill_on_device=self.prefill_on_device[p])  # fmt: skip

    def link(self) -> LinkTraffic:
        """What crosses the host link between the GPUs and the memory-side device in each step of this plan."""
        return LinkTraffic(int(self.decode_on_device.sum()), int(self.prefill_chunks[self.prefill_on_device].sum()))

    @property
    def empty(self) -> bool:
        return len(self.decode_ids) == 0 and len(self.prefill_ids) == 0

    @property
    def decode_only(self) -> bool:
        return len(self.prefill_ids) == 0 and len(self.decode_ids) > 0

    @property
    def batch_size(self) -> int:
        return len(self.decode_ids) + len(self.prefill_ids)


class LinkTraffic(NamedTuple):
    """Per step of a plan, over the host link: each of `decodes` requests sends its new token's Q, K and V up and
    gets its attention output back; `prefill_kv_tokens` tokens of prompt K and V go up to be stored. (The KV of
    the plan's `migrate_ids` moves from the device into HBM too, behind the outputs.)"""

    decodes: int
    prefill_kv_tokens: int


@dataclass(frozen=True)
class BatchShape:
    """Aggregate work of an iteration (tokens). `decode_ctx` may be an array: one entry per repeated step."""

    n_decode: int
    decode_ctx: np.ndarray | float  # sum over decode requests of tokens attended
    prefill_tokens: int = 0
    prefill_pairs: float = 0.0  # causal query-key pairs of the prefill chunks
    prefill_kv_tokens: float = 0.0  # KV tokens the prefill chunks attend over
    n_sampled: int = 0  # tokens projected to the vocabulary (decodes + completed prefills)

    @property
    def n_tokens(self) -> int:
        return self.n_decode + self.prefill_tokens

    @staticmethod
    def of(plan: Plan, decode_context: np.ndarray) -> BatchShape:
        """Shape of a single iteration; `decode_context` = tokens attended per decode request."""
        c = plan.prefill_chunks.astype(np.float64)
        p = plan.prefill_prefix.astype(np.float64)
        return BatchShape(
            n_decode=len(plan.decode_ids),
            decode_ctx=float(decode_context.sum()),
            prefill_tokens=int(c.sum()),
            prefill_pairs=float((c * p + c * (c + 1) / 2).sum()),
            prefill_kv_tokens=float((p + c).sum()),
            n_sampled=len(plan.decode_ids) + int(plan.prefill_completes.sum()),
        )
