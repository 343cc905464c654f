"""Run metrics gathered as the executor advances: token-gap histogram, batch sizes, busy time, timeline."""

from __future__ import annotations

import numpy as np

from l3.sim.plan import Plan
from l3.systems.base import IterationTiming


class LogHistogram:
    """Weighted histogram on log-spaced bins (1e-7 s .. 1e4 s, 0.23% wide): bounded memory percentiles."""

    PER_DECADE = 1000
    LO, HI = -7.0, 4.0

    def __init__(self):
        self.counts = np.zeros(int((self.HI - self.LO) * self.PER_DECADE) + 1)

    def add(self, values, weights) -> None:
        v = np.maximum(np.asarray(values, float), 10**self.LO)
        idx = np.clip(((np.log10(v) - self.LO) * self.PER_DECADE).astype(np.int64), 0, len(self.counts) - 1)
        self.counts += np.bincount(
            idx, weights=np.broadcast_to(weights, idx.shape), minlength=len(self.counts)
        )

    @property
    def total(self) -> float:
        return float(self.counts.sum())

    def quantile(self, q: float) -> float:
        """Value at quantile q (bin centre); NaN if empty."""
        total = self.total
        if total <= 0:
            return float("nan")
        i = int(np.searchsorted(np.cumsum(self.counts), q * total, side="left"))
        return float(10 ** (self.LO + (min(i, len(self.counts) - 1) + 0.5) / self.PER_DECADE))


class Metrics:
    def __init__(self, devices: tuple[str, ...], timeline_limit: int):
        self.tbt = LogHistogram()
        self.steps = 0
        self.batch_sum = 0.0  # sum over steps of requests in the batch
        self.busy = dict.fromkeys(devices, 0.0)
        self.stats: dict[str, float] = {}  # sums over steps of system-specific quantities
        self.timeline_limit = timeline_limit
        # (replica, plan index, device, start, end, label): device intervals of recorded plans
        self.timeline: list[tuple[int, int, str, float, float, str]] = []
        self._series: list[tuple[int, float, float, int, int, float]] = []  # replica,t0,t1,steps,batch,tokens

    def record(self, replica: int, t0: float, plan: Plan, timing: IterationTiming) -> None:
        """One executed plan (all its steps)."""
        durations = timing.durations
        k = len(durations)
        n_decode = len(plan.decode_ids)
        if n_decode:
            self.tbt.add(durations, n_decode)
        self.steps += k
        self.batch_sum += plan.batch_size * k
        for dev, b in timing.busy.items():
            self.busy[dev] = self.busy.get(dev, 0.0) + float(np.sum(b))
        for key, v in timing.stats.items():
            self.stats[key] = self.stats.get(key, 0.0) + float(np.sum(v))
        t1 = t0 + float(np.sum(durations))
        tokens = n_decode * k + int(plan.prefill_completes.sum())
        self._series.append((replica, t0, t1, k, plan.batch_size, tokens))
        if timing.intervals and len(self.timeline) < self.timeline_limit:
            plan_no = len(self._series) - 1
            self.timeline.extend((replica, plan_no, iv.device, t0 + iv.start, t0 + iv.end, iv.label)
                                 for iv in timing.intervals)  # fmt: skip

    @property
    def mean_batch_size(self) -> float:
        return self.batch_sum / self.steps if self.steps else 0.0

    def series(self) -> np.ndarray:
        """Rows (replica, t0, t1, steps, batch, tokens), one per executed plan."""
        return np.asarray(self._series, dtype=float).reshape(-1, 6)
