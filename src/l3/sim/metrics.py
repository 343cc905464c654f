"""Run metrics gathered as the executor advances: token-gap histogram, batch sizes, busy time, timeline."""

from __future__ import annotations

import numpy as np

from l3.sched.plan import Plan
from l3.sched.timing import IterationTiming


class LogHistogram:
    """Weighted histogram on log-spaced bins (1e-7 s .. 1e4 s, 0.23% wide): bounded memory percentiles."""

    PER_DECADE = 1000
    LO, HI = -7.0, 4.0

    def __init__(self):
        self.counts = np.zeros(int((self.HI - self.LO) * self.PER_DECADE) + 1)

    def add(self, values, weights) -> None:
        v = np.maximum(np.asarray(values, float), 10**self.LO)
        idx = np.clip(((np.log10(v) - self.LO) * self.PER_DECADE).astype(np.int64), 0, len(self.counts) - 1)
        np.add.at(self.counts, idx, np.broadcast_to(weights, idx.shape))  # few values a call, far fewer than bins

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


def _first(v) -> float:
    return float(v.flat[0]) if isinstance(v, np.ndarray) else float(np.asarray(v).reshape(-1)[0])


def _sum(v) -> float:
    return float(v.sum()) if isinstance(v, np.ndarray) else float(np.sum(v))


class TimelineSample:
    """Device intervals of a sample of the run's recordable iterations (single-step plans that decode), spread
    evenly over the run: every `stride`-th one is recorded; when more than `limit` are kept, the stride doubles
    and every other kept one is dropped. Memory stays bounded (at most `limit` iterations) whatever the run's
    length, and the sample covers the whole run, steady state included, not only its start."""

    def __init__(self, limit: int):
        self.limit = limit
        self.stride = 1
        self.offered = 0  # recordable iterations seen so far
        self._pending = -1  # offer index of the iteration being recorded
        self._plans: dict[int, tuple[int, tuple]] = {}  # plan index -> (offer index, (replica, t0, intervals))

    def wants(self) -> bool:
        """Ask once per recordable iteration, before it runs: whether to record its intervals."""
        self._pending, self.offered = self.offered, self.offered + 1
        return self.limit > 0 and self._pending % self.stride == 0

    def add(self, plan_no: int, intervals: tuple[int, float, list]) -> None:
        """Keep plan `plan_no`'s (replica, start time, intervals) if the sample still wants it."""
        self._plans[plan_no] = (self._pending, intervals)
        while len(self._plans) > self.limit:
            self.stride *= 2
            self._plans = {p: v for p, v in self._plans.items() if v[0] % self.stride == 0}

    @property
    def rows(self) -> list[tuple[int, int, str, float, float, str]]:
        """(replica, plan index, device, start s, end s, label) of the kept plans' intervals."""
        rows = []
        for p in sorted(self._plans):
            replica, t0, intervals = self._plans[p][1]
            rows += [(replica, p, iv.device, t0 + iv.start, t0 + iv.end, iv.label) for iv in intervals]
        return rows


class Metrics:
    def __init__(self, devices: tuple[str, ...], timeline_plans: int):
        self.tbt = LogHistogram()
        self.steps = 0
        self.batch_sum = 0.0  # sum over steps of requests in the batch
        self.busy = dict.fromkeys(devices, 0.0)
        self.stats: dict[str, float] = {}  # sums over steps of system-specific quantities
        self.bound_s = 0.0  # sum over replicas' steps of the hardware's lower bound on each step's duration
        self.losses: dict[str, float] = {}  # sums over steps of duration - bound, by cause (sched.timing.LOSSES)
        self.energy_j: dict[str, float] = {}  # sums over steps of dynamic energy, by sched.timing.ENERGY_PARTS
        self.kv_block_s: np.ndarray | None = None  # per KV tier: blocks held x seconds, summed over replicas
        self.sample = TimelineSample(timeline_plans)
        self.output_tokens = 0  # tokens put out by the plans recorded so far
        # replica, t0, t1, steps, batch, tokens, bound (s: the sum of the plan's steps' bounds)
        self._series: list[tuple[int, float, float, int, int, float, float]] = []

    def record(self, replica: int, t0: float, plan: Plan, timing: IterationTiming) -> None:
        """One executed plan (all its steps)."""
        durations = timing.durations
        k = len(durations)
        n_decode = len(plan.decode_ids)
        if n_decode:
            self.tbt.add(durations, n_decode)
        self.steps += k
        self.batch_sum += plan.batch_size * k
        total = _first if k == 1 else _sum  # a one-step plan's sums are its values
        for sums, per_step in ((self.busy, timing.busy), (self.stats, timing.stats), (self.losses, timing.losses),
                               (self.energy_j, timing.energy)):  # fmt: skip
            for key, v in per_step.items():
                sums[key] = sums.get(key, 0.0) + total(v)
        bound = total(timing.bound) if timing.bound is not None else 0.0
        self.bound_s += bound
        t1 = t0 + total(durations)
        tokens = n_decode * k + int(plan.prefill_completes.sum())
        self.output_tokens += tokens
        self._series.append((replica, t0, t1, k, plan.batch_size, tokens, bound))
        if timing.intervals:
            self.sample.add(len(self._series) - 1, (replica, t0, timing.intervals))

    @property
    def timeline(self) -> list[tuple[int, int, str, float, float, str]]:
        """(replica, plan index, device, start s, end s, label): the sampled iterations' device intervals."""
        return self.sample.rows

    def hold(self, used_blocks: np.ndarray, seconds: float) -> None:
        """A replica held `used_blocks` KV blocks per tier for `seconds` (after the plan it just ran)."""
        held = np.asarray(used_blocks, float) * seconds
        self.kv_block_s = held if self.kv_block_s is None else self.kv_block_s + held

    @property
    def mean_batch_size(self) -> float:
        return self.batch_sum / self.steps if self.steps else 0.0

    def series(self) -> np.ndarray:
        """Rows (replica, t0, t1, steps, batch, tokens, bound seconds), one per executed plan."""
        return np.asarray(self._series, dtype=float).reshape(-1, 7)

    def output_times(self, fractions, total: float | None = None) -> np.ndarray:
        """Times (s) at which each fraction of all output tokens (`total`, by default the recorded plans') was
        out (see `output_times`)."""
        s = self.series()
        return output_times(s[:, 1], s[:, 2], s[:, 5], fractions, total)

    def steady_throughput(self, total: float | None = None) -> float | None:
        """Output tokens/s between the times 10% and 90% of all output tokens were out (None if no span).
        `total`: the run's whole output where the plans recorded stop short of it (`Simulator.run`'s
        `until_output`); by default the recorded plans' tokens."""
        t10, t90 = self.output_times([0.1, 0.9], total)
        total = float(self.series()[:, 5].sum()) if total is None else total
        return 0.8 * total / (t90 - t10) if t90 > t10 else None

    def steady_bound_s(self) -> float | None:
        """The steps' bounds (s, summed over replicas) that fall between the times 10% and 90% of the output was
        out, each plan's bound spread evenly over its duration as its tokens are (None if no span)."""
        t10, t90 = self.output_times([0.1, 0.9])
        if not t90 > t10:
            return None
        s = self.series()
        t0, t1 = s[:, 1], s[:, 2]
        inside = np.clip(np.minimum(t1, t90) - np.maximum(t0, t10), 0.0, None)
        return float((s[:, 6] * inside / np.where(t1 > t0, t1 - t0, 1.0)).sum())

    @property
    def busy_s(self) -> float:
        """Sum over replicas of the time they spent executing plans (s)."""
        s = self.series()
        return float((s[:, 2] - s[:, 1]).sum())


def output_times(t0: np.ndarray, t1: np.ndarray, tokens: np.ndarray, fractions,
                 total: float | None = None) -> np.ndarray:  # fmt: skip
    """Times at which the given fractions of all output were out, where plan i puts out tokens[i] evenly over
    [t0[i], t1[i]] (exact at step granularity for a run of equal steps; plans of several replicas overlap).
    The cumulative count is piecewise linear; each fraction is found on its segment. NaN if no tokens, or if
    the plans given never reach a fraction of `total` (by default the plans' own tokens)."""
    fractions = np.atleast_1d(np.asarray(fractions, float))
    keep = tokens > 0
    t0, t1, tokens = t0[keep], t1[keep], tokens[keep]
    if not len(tokens):
        return np.full(len(fractions), np.nan)
    span = t1 - t0
    point = span <= 0  # instantaneous plans: a jump of the count at t0
    rate = np.where(point, 0.0, tokens / np.where(point, 1.0, span))
    times = np.concatenate([t0, t1])
    order = np.argsort(times, kind="stable")
    times = times[order]
    slope = np.concatenate([rate, -rate])[order]
    jump = np.concatenate([np.where(point, tokens, 0.0), np.zeros(len(tokens))])[order]
    rate_after = np.cumsum(slope)  # output rate on [times[k], times[k+1])
    # count just after times[k] (jumps included), and the count just before it
    after = np.cumsum(jump + np.concatenate([[0.0], rate_after[:-1] * np.diff(times)]))
    before = after - jump
    total = after[-1] if total is None else total
    out = np.empty(len(fractions))
    for i, q in enumerate(fractions):  # few fractions; each a binary search
        target = q * total
        if target > after[-1]:
            out[i] = np.nan
            continue
        k = min(int(np.searchsorted(after, target, side="left")), len(times) - 1)  # first point reaching it
        if k > 0 and before[k] >= target > after[k - 1] and rate_after[k - 1] > 0:  # on the segment before k
            out[i] = min(times[k - 1] + (target - after[k - 1]) / rate_after[k - 1], times[k])
        else:  # at point k (a jump there, or the target is exactly its count)
            out[i] = times[k]
    return out
