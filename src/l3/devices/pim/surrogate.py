"""Fast vectorised estimate of the timing engine's answer, for the simulator's hot path.

The engine's schedule of one rank is a sum of per-round pieces plus a few exposed edges, so the surrogate
measures those pieces *with the engine itself* (on one-, two- and three-round streams) and composes
them with numpy:

    T(rank) = R * sum_i B(s_i) + (n - 1) * H + E(s_last) + N_ref * c_ref

- s_i = ceil(context_i / N_bk): slots per bank of request i; R head rounds per request; n requests.
- B(s): marginal cost of one more round of s slots (its host K/V writes and its kernel), from engine runs of
  one to three rounds (T_r); E(s): the exposed start (first Q) and end (accumulator drain, output read) of a
  rank's work; H: the extra cost per additional request (Q write). See `_measure`.
- Beyond a warm-up (grown until pipeline transients are over) the kernel repeats every `shape.period`
  slots, so B grows by a constant per period: B(s) = B(r) + q * (B(r) - B(r - period)) with r the slot count
  q periods back in the measured range. Each score-buffer segment boundary adds a measured constant X.
- Refresh: N_ref = the refreshes falling due while the bank side is busy (first due tREFI / 2, then every
  tREFI, as in the engine), each costing c_ref(s) = the mean delay per refresh the engine shows on a stream of
  rounds of s slots (small where the bank side mostly waits for the rank link and refresh hides), and c_1(s)
  for refreshes in a rank's first round, measured on a one-round stream. Past the measured range a round hides
  the same delay behind its edges as the sample it extends, and its further refreshes cost c_long, the delay per
  refresh inside one round long enough for eight (measured once): refresh grows with time, at the kernel's own
  long-round cost, instead of repeating a short round's.

Energy rides along: every piece carries the engine's energy counts (timing.COUNTS) beside its time categories,
composed the same way; each refresh adds the activations that re-open the rows it closed (measured once), and
the caller turns counts, cycles and refreshes into joules (energy.PimEnergy).

Measured pieces are cached per slot count, so cost is paid once per distinct s (in the measured range), and kept
in a `MeasurementStore` where one is given, so later processes on the machine pay nothing.
"""

from __future__ import annotations

import dataclasses
import math

import numba
import numpy as np

from l3.devices.pim.kernels import KernelShape, rank_layer_stream
from l3.devices.pim.measurements import MeasurementStore
from l3.devices.pim.timing import CATEGORIES, COUNTS, EngineResult, RankEngine
from l3.specs.dram import DramSpec
from l3.specs.model import ModelSpec
from l3.specs.pim import PimSpec

_NC = len(CATEGORIES)
_NV = _NC + len(COUNTS)  # a piece: its cycles per category, then its energy counts
_REFRESH = CATEGORIES.index("refresh")
_ACT = _NC + COUNTS.index("act")
_COLS = 2 * _NV + 3


class PimSurrogate:
    """Per-rank time of one layer's decode attention, vectorised over requests and queries."""

    def __init__(self, dram: DramSpec, pim: PimSpec, model: ModelSpec, store: MeasurementStore | None = None):
        """`store`: where measurements persist across processes (None: measured in this object only)."""
        self.shape = KernelShape.build(dram, pim, model)
        self._rounds = self.shape.rounds
        self.refi = dram.timing.refi
        self._engine = RankEngine(dram, pim, refresh=False)
        self._engine_ref = RankEngine(dram, pim, refresh=True)
        self._store = store
        stored = store.load() if store is not None else {}
        self._memo: dict[int, np.ndarray] = {int(k[2:]): v for k, v in stored.items() if k.startswith("s/")}
        sh = self.shape
        self._k = min(sh.rounds, 3)  # rounds per request measured
        self.period = sh.period
        if "init" in stored:  # s_hi, c1_long, acts per refresh, then H and X
            init = stored["init"]
            self.s_hi, self._c1_long, self.acts_per_refresh = int(init[0]), float(init[1]), float(init[2])
            self._h, self._x = init[3 : 3 + _NV], init[3 + _NV :]
            self._tab = np.full((self.s_hi + 1, _COLS), np.nan)
            return
        self.s_hi = self._warm_up() * self.period
        self._tab = np.full((self.s_hi + 1, _COLS), np.nan)  # per s: B, E (cycles/category, counts), tail, c_1, c_ref
        self._x = np.zeros(_NV)
        self._c1_long, self.acts_per_refresh = self._first_round_refresh()
        k = self._k
        self._h = self._vec(self._run(k, [sh.n_bk, sh.n_bk])) - self._vec(self._run(k, [sh.n_bk]))
        self._h -= k * self._lookup(np.array([1]))[0][0]
        if sh.mapped:
            s_x = sh.segment + self.period
            self._x = self._measure(s_x)[:_NV] - self._lookup(np.array([s_x]), segments=False)[0][0]
        if store is not None:
            store.put("init", np.concatenate([[self.s_hi, self._c1_long, self.acts_per_refresh], self._h, self._x]))

    # --- engine measurements -----------------------------------------------------------------------
    def _run(self, rounds: int, contexts: list[int], refresh: bool = False) -> EngineResult:
        sh = dataclasses.replace(self.shape, n_kv_heads=self.shape.groups * rounds)
        eng = self._engine_ref if refresh else self._engine
        return eng.run(rank_layer_stream(sh, contexts), serial=sh.serial)

    @staticmethod
    def _vec(res: EngineResult) -> np.ndarray:
        return np.array([res.breakdown[c] for c in CATEGORIES] + [res.counts[c] for c in COUNTS], dtype=float)

    def _measure(self, s: int) -> np.ndarray:
        """(B, E, bank-side tail, c_1, c_ref) of slot count s, cycles, as one row of `_tab`. With k = min(R, 3)
        rounds measured: B = T_k - T_(k-1) (T_3 - T_2 once rounds are in steady state; T_2 - T_1 for R = 1),
        E = T_k - k B, so one request of R <= 3 rounds is exact and longer ones extrapolate linearly. c_ref = mean
        delay per refresh over enough rounds for six; c_1 the same within one round (no earlier round's drain to
        stall on, so refresh hides less)."""
        if s not in self._memo:
            ctx, k = int(s) * self.shape.n_bk, self._k
            t = {r: self._run(r, [ctx]) for r in range(1, max(k, 2) + 1)}
            m = max(k, 2)
            b = self._vec(t[m]) - self._vec(t[m - 1])
            rounds = max(m, math.ceil(6 * self.refi / b[:_NC].sum()))
            off = t[m] if rounds == m else self._run(rounds, [ctx])
            on = self._run(rounds, [ctx], refresh=True)
            c_ref = (on.cycles - off.cycles) / max(1, on.refreshes)
            one_on = self._run(1, [ctx], refresh=True)
            c_1 = (one_on.cycles - t[1].cycles) / one_on.refreshes if one_on.refreshes else c_ref
            tail = t[k].cycles - t[k].bank_cycles
            self._memo[s] = np.concatenate([b, self._vec(t[k]) - k * b, [tail, c_1, c_ref]])
            if self._store is not None:
                self._store.put(f"s/{s}", self._memo[s])
        return self._memo[s]

    def _warm_up(self) -> int:
        """Periods measured directly: doubled until B grows per period as it does far out (pipeline
        transients and link-bound starts over), at most what one score-buffer segment holds."""
        p = self.period
        k_ref = min(self.shape.segment // p, 64)
        d_ref = self._measure(k_ref * p)[:_NC].sum() - self._measure((k_ref - 1) * p)[:_NC].sum()
        k = 4
        while k < k_ref:
            b = [self._measure(j * p)[:_NC].sum() for j in (k - 2, k - 1, k)]
            if all(abs(d - d_ref) <= 1e-4 * b[2] for d in (b[1] - b[0], b[2] - b[1])):
                break
            k = min(2 * k, k_ref)
        return min(k, k_ref)

    def _first_round_refresh(self) -> tuple[float, float]:
        """c_1 for first rounds longer than the measured range, and the activations per refresh (re-opening the
        rows it closed), from one round long enough for eight refreshes."""
        s = self.s_hi
        while (off := self._run(1, [s * self.shape.n_bk])).bank_cycles < 8 * self.refi and s < 1 << 16:
            s *= 2
        on = self._run(1, [s * self.shape.n_bk], refresh=True)
        n = max(1, on.refreshes)
        return (on.cycles - off.cycles) / n, (on.counts["act"] - off.counts["act"]) / n

    def _fill(self, s: np.ndarray) -> None:
        missing = s[np.isnan(self._tab[s, 0])]
        for v in np.unique(missing) if len(missing) else ():
            self._tab[v] = self._measure(int(v))

    # --- composition ---------------------------------------------------------------------------------
    def _lookup(self, s: np.ndarray, segments: bool = True) -> tuple[np.ndarray, ...]:
        """B (n, categories + counts), E (n, categories + counts), bank tail, c_1 and c_ref (n,) for slot counts
        s >= 1 (`_lookup_rows`), measuring the rows they need first."""
        s = np.ascontiguousarray(s, np.int64)
        self._fill(_rows_needed(s, self._tab, self.s_hi, self.period))
        return _lookup_rows(s, self._tab, self.s_hi, self.period, self.shape.segment, np.ascontiguousarray(self._x),
                            bool(segments and self.shape.mapped), float(self._c1_long))  # fmt: skip

    def _with_refresh(self, t: np.ndarray, tail: np.ndarray, first: np.ndarray, c_1: np.ndarray,
                      c_ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Add refresh to pieces t (ranks, categories + counts) whose bank side ends `tail` before the end and
        whose first round takes about `first` cycles (refreshes there cost c_1, later ones c_ref, and each
        re-opens the rows it closed). Returns t and the refreshes per rank."""
        flat = np.ascontiguousarray  # one compiled signature for every caller
        n = _add_refresh(t, flat(tail, float), flat(first, float), flat(c_1, float), flat(c_ref, float),
                         float(self.refi), float(self.acts_per_refresh))  # fmt: skip
        return t, n

    def rank_cycles(self, contexts: np.ndarray, rank: np.ndarray, n_ranks: int) -> np.ndarray:
        """Per-rank breakdown (n_ranks, categories) in cycles of one layer's attention. Request i (context
        contexts[i] tokens) runs on rank rank[i]; each rank serves its requests in input order."""
        return self.rank_work(contexts, rank, n_ranks)[0]

    def rank_work(self, contexts: np.ndarray, rank: np.ndarray,
                  n_ranks: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
        """`rank_cycles`, with each rank's energy counts (n_ranks, COUNTS) and refreshes (n_ranks,)."""
        contexts, rank = np.asarray(contexts, dtype=np.int64), np.asarray(rank, dtype=np.int64)
        n_ref = np.zeros(n_ranks)
        if contexts.size == 0:
            return np.zeros((n_ranks, _NC)), np.zeros((n_ranks, _NV - _NC)), n_ref
        b, e, tail, c_1, c_ref = self._lookup(-(-contexts // self.shape.n_bk))
        out, n_ref = _compose(b, e, tail, c_1, c_ref, rank, int(n_ranks), float(self._rounds),
                              np.ascontiguousarray(self._h, float), float(self.refi), float(self.acts_per_refresh))
        return out[:, :_NC], out[:, _NC:], n_ref

    def uniform_cycles(self, n_requests: np.ndarray, context: np.ndarray) -> np.ndarray:
        """Total cycles of ranks each holding n_requests[j] requests of context[j] tokens (0 for none);
        vectorised over queries j."""
        n, ctx = np.asarray(n_requests, dtype=np.int64), np.maximum(np.asarray(context, dtype=np.int64), 1)
        b, e, tail, c_1, c_ref = self._lookup(-(-ctx // self.shape.n_bk))
        t = (n * self._rounds)[:, None] * b + (n - 1)[:, None] * self._h + e
        return self._with_refresh(t, tail, b[:, :_NC].sum(axis=1), c_1, c_ref)[0][:, :_NC].sum(axis=1) * (n > 0)


@numba.njit(cache=True)
def _add_refresh(t, tail, first, c_1, c_ref, refi, acts_per_refresh):
    """`PimSurrogate._with_refresh` in place on t; returns the refreshes per row. Refreshes fall due while the
    bank side is busy, first at tREFI / 2, then every tREFI; each costs c (c_1 in the first round, c_ref after,
    weighted by time), which lengthens the busy time they fall in (three passes settle the count)."""
    half = refi // 2
    n_out = np.zeros(len(t))
    for i in range(len(t)):
        busy = -tail[i]
        for j in range(_NC):
            busy += t[i, j]
        if busy > 0:
            c = (c_1[i] * min(first[i], busy) + c_ref[i] * max(busy - first[i], 0.0)) / max(busy, 1.0)
        else:
            c = c_ref[i]
        n = 0.0
        for _ in range(3):
            end = busy + n * c
            n = np.floor((end - half) / refi) + 1 if end >= half else 0.0
        t[i, _REFRESH] += n * c
        t[i, _ACT] += n * acts_per_refresh
        n_out[i] = n
    return n_out


@numba.njit(cache=True)
def _compose(b, e, tail, c_1, c_ref, rank, n_ranks, rounds, h, refi, acts_per_refresh):
    """Every rank's pieces (n_ranks, categories + counts) and refreshes of one layer: request i (pieces B b[i],
    E e[i], bank tail, c_1, c_ref) on rank rank[i]; a rank serves its requests in input order:
    T = R sum B + (n - 1) H + E(last) + refresh, refresh weighted by the time of each request's rounds."""
    m, nv = b.shape
    out = np.zeros((n_ranks, nv))
    count = np.zeros(n_ranks, np.int64)
    last, first = np.full(n_ranks, -1), np.full(n_ranks, m)
    w_sum, wc_sum = np.zeros(n_ranks), np.zeros(n_ranks)
    weight = np.zeros(m)
    for i in range(m):
        r = rank[i]
        for j in range(nv):
            out[r, j] += b[i, j]
        count[r] += 1
        last[r] = i
        first[r] = min(first[r], i)
        for j in range(_NC):
            weight[i] += b[i, j]
    for i in range(m):  # each rank's refresh delay per event: its requests' c_ref, weighted by their time
        r = rank[i]
        wc_sum[r] += weight[i] * c_ref[i]
        w_sum[r] += weight[i]
    on = np.flatnonzero(count > 0)
    busy = np.empty((len(on), nv))
    for k in range(len(on)):
        r = on[k]
        for j in range(nv):
            busy[k, j] = out[r, j] * rounds + ((count[r] - 1) * h[j] + e[last[r], j])
    tails, firsts = tail[last[on]], weight[first[on]]
    n_ref = np.zeros(n_ranks)
    refreshes = _add_refresh(busy, tails, firsts, c_1[first[on]], wc_sum[on] / w_sum[on], refi, acts_per_refresh)
    for k in range(len(on)):
        r = on[k]
        out[r] = busy[k]
        n_ref[r] = refreshes[k]
    return out, n_ref


@numba.njit(cache=True)
def _sample_of(v, s_hi, period):
    """(q, r): slot count v as r + q periods, r the sample it extends inside the measured range (q = 0 within)."""
    q = -(-(v - s_hi) // period) if v > s_hi else 0
    return q, v - q * period


@numba.njit(cache=True)
def _rows_needed(s, tab, s_hi, period):
    """The measured rows (slot counts) `_lookup_rows` reads for slot counts s that `tab` does not hold yet."""
    out = np.empty(2 * len(s), np.int64)
    k = 0
    for v in s:
        q, r = _sample_of(v, s_hi, period)
        if np.isnan(tab[r, 0]):
            out[k] = r
            k += 1
        if q and np.isnan(tab[r - period, 0]):
            out[k] = r - period
            k += 1
    return out[:k]


@numba.njit(cache=True)
def _lookup_rows(s, tab, s_hi, period, segment, x, segments, c1_long):
    """B, E (n, categories + counts), bank tail, c_1 and c_ref (n,) of slot counts s >= 1 from the measured rows
    `tab`. Within the measured range (s <= s_hi) a row is its sample; past it, s = r + q x period with r the
    count q periods back inside the range, and B(s) = B(r) + q (B(r) - B(r - period)). With `segments`, each
    score-buffer segment boundary adds X. Past the range a round hides the delay of its edge refreshes as the
    sample it extends does (h = (c_long - c_ref(r)) B(r) per round), and every further refresh costs c_long, the
    delay per refresh inside one long round: c_ref(s) = c_long - h / B(s), c_1(s) = c_long."""
    n = len(s)
    b, e = np.empty((n, _NV)), np.empty((n, _NV))
    tail, c_1, c_ref = np.empty(n), np.empty(n), np.empty(n)
    for i in range(n):
        v = s[i]
        far = v > s_hi
        q, r = _sample_of(v, s_hi, period)
        for j in range(_NV):
            b[i, j] = tab[r, j] + q * (tab[r, j] - tab[r - period, j]) if far else tab[r, j]
            e[i, j] = tab[r, _NV + j]
        if segments:
            k = (v - 1) // segment
            for j in range(_NV):
                b[i, j] = b[i, j] + k * x[j]
        tail[i], c_1[i], c_ref[i] = tab[r, 2 * _NV], tab[r, 2 * _NV + 1], tab[r, 2 * _NV + 2]
        if far:
            measured, grown = 0.0, 0.0
            for j in range(_NC):
                measured += tab[r, j]
                grown += b[i, j]
            c_ref[i] = c1_long - (c1_long - c_ref[i]) * measured / max(grown, 1.0)
            c_1[i] = c1_long
    return b, e, tail, c_1, c_ref
