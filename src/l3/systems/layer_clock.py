"""The per-layer schedule of one iteration of an attention-offload system and its units' loads, compiled (numba).

Free times of the GPU, the two host-link directions, each sub-batch's return and every unit (rank) advance layer
by layer: per sub-batch, its dense work and prefill attention on the GPU, its Q/K/V up the host link, attention on
its units, its outputs down the link; the next layer of that sub-batch waits for its return. Without the pipeline
(`seq`) every part waits for all earlier parts. All updates are max-plus (max and +), per step of a multi-step
iteration independently.

The graph repeats every R layers (the rankset rotation), and every period after the first (whose layer 0 has no
post-attention work) is the same map of resource times. That map commutes with a uniform shift: once one period
advances every resource by the same amount, every later one does too, and the remaining whole periods are added
in one step (`shortcut`; exact up to rounding). Recording (one step) keeps every part's start and end instead.
`unit_loads` sums what the units do over the layers (slowest, mean, idle, per rankset) for the iteration's timing
record and bound.
"""

from __future__ import annotations

from collections.abc import Sequence

import numba
import numpy as np

from l3.sched.timing import Interval

# The rows of a sub-batch's per-layer times (`layer_times`' `parts`, (P, len(PART_ROWS), steps)), in seconds.
PART_ROWS = ("pre", "pattn", "post", "merge", "head", "up", "up_bg", "down", "down_bg", "host_merge")
PRE, PATTN, POST, MERGE, HEAD, UP, UP_BG, DOWN, DOWN_BG, HOST_MERGE = range(len(PART_ROWS))
# What a recorded layer keeps of each sub-batch (`LayerRecord.layers`, (P, L, len(REC_COLS))), seconds.
REC_COLS = ("start", "dense_end", "gpu_end", "up_start", "up_end", "up_free", "down_start", "returned", "down_free")
SHORTCUT_RTOL = 1e-12  # a period's advance counts as uniform within this fraction of its largest advance


@numba.njit(cache=True)
def _clock(n_layers, ranksets, seq, shortcut, sub_of, parts, work0, work1, durations, rec_layers, rec_ranks,
           rec_final):  # fmt: skip
    """Fill `durations` (steps,); with `rec_layers` non-empty, step 0's times into the rec_ arrays (see
    `layer_times`). work0/work1: (steps, R, n) unit seconds of sub-batch part 0 and 1."""
    n_parts, steps, n = parts.shape[0], parts.shape[2], work0.shape[2]
    record = rec_layers.shape[0] > 0
    # per part and residue: the units with work at any step
    idx = np.zeros((n_parts, ranksets, n), np.int64)
    cnt = np.zeros((n_parts, ranksets), np.int64)
    used = np.zeros(n, np.bool_)
    for p in range(n_parts):
        w = work0 if p == 0 else work1
        for rho in range(ranksets):
            for r in range(n):
                for s in range(steps):
                    if w[s, rho, r] > 0.0:
                        idx[p, rho, cnt[p, rho]] = r
                        cnt[p, rho] += 1
                        used[r] = True
                        break
    used_idx = np.flatnonzero(used)
    n_state = 3 + n_parts + len(used_idx)
    now, last = np.empty(n_state), np.empty(n_state)
    ranks = np.empty(n)
    ret = np.empty(2)
    for s in range(steps):
        gpu = up = down = 0.0
        ret[:] = 0.0
        ranks[:] = 0.0
        layer, have_last = 0, False
        while layer < n_layers:
            if shortcut and layer % ranksets == 0 and layer > 0:
                now[0], now[1], now[2] = gpu, up, down
                for p in range(n_parts):
                    now[3 + p] = ret[sub_of[p]]
                for j in range(len(used_idx)):
                    now[3 + n_parts + j] = ranks[used_idx[j]]
                if have_last:
                    lo, hi, big = np.inf, -np.inf, 1.0
                    for j in range(n_state):
                        d = now[j] - last[j]
                        lo, hi, big = min(lo, d), max(hi, d), max(big, abs(d))
                    if hi - lo <= SHORTCUT_RTOL * big:
                        m = (n_layers - layer) // ranksets
                        shift = m * (now[0] - last[0])
                        gpu, up, down = gpu + shift, up + shift, down + shift
                        ret[0] += shift
                        ret[1] += shift
                        ranks += shift
                        layer += m * ranksets
                        have_last = False
                        if layer >= n_layers:
                            break
                last[:] = now
                have_last = True
            for p in range(n_parts):
                q, x = sub_of[p], parts[p, :, s]
                w = work0 if p == 0 else work1
                start = max(gpu, ret[q])
                dense_end = start + ((x[MERGE] + x[POST]) if layer else 0.0) + x[PRE]
                gpu = dense_end + x[PATTN]
                if record and s == 0:
                    rec_layers[p, layer, 0], rec_layers[p, layer, 1], rec_layers[p, layer, 2] = start, dense_end, gpu
                if seq:
                    up = down = gpu
                    ranks[:] = gpu
                up_start = max(gpu if seq else dense_end, up)
                up_end = up_start + x[UP]
                up = up_end + x[UP_BG]
                if seq:
                    gpu = down = up
                    ranks[:] = up
                rho = layer % ranksets
                if record and s == 0:
                    rec_layers[p, layer, 3], rec_layers[p, layer, 4], rec_layers[p, layer, 5] = up_start, up_end, up
                if cnt[p, rho] == 0:
                    ret[q] = gpu
                    continue
                ready = up if seq else up_end
                pim_end = -np.inf
                for j in range(cnt[p, rho]):
                    r = idx[p, rho, j]
                    r_start = max(ranks[r], ready)
                    r_end = r_start + w[s, rho, r]
                    if w[s, rho, r] > 0.0:
                        ranks[r] = r_end
                        pim_end = max(pim_end, r_end)
                    else:
                        pim_end = max(pim_end, ready)
                    if record and s == 0:
                        rec_ranks[p, layer, r, 0], rec_ranks[p, layer, r, 1] = r_start, r_end
                if seq:
                    gpu = up = down = pim_end
                    ranks[:] = pim_end
                down_start = max(pim_end + x[HOST_MERGE], down)
                ret[q] = down_start + x[DOWN]
                down = ret[q] + x[DOWN_BG]
                if seq:
                    gpu = up = down
                    ranks[:] = down
                if record and s == 0:
                    rec_layers[p, layer, 6], rec_layers[p, layer, 7] = down_start, ret[q]
                    rec_layers[p, layer, 8] = down
            layer += 1
        gpu_free = gpu
        for p in range(n_parts):
            x = parts[p, :, s]
            start = max(gpu_free, ret[sub_of[p]])
            gpu_free = start + x[MERGE] + x[POST] + x[HEAD]
            if record and s == 0:
                rec_final[p, 0], rec_final[p, 1] = start, gpu_free
        durations[s] = max(gpu_free, max(up, down))


def layer_times(n_layers: int, ranksets: int, seq: bool, sub_of: list[int], parts: np.ndarray,
                works: list[np.ndarray], record: bool, lanes: list[str]) -> tuple[np.ndarray, LayerRecord | list]:
    """Per-step durations of an iteration of the sub-batches `sub_of` (their indices, 0 or 1), and, with
    `record` (a one-step iteration), its device intervals (a `LayerRecord`; else an empty list).

    parts: (P, len(PART_ROWS), steps) per-layer seconds of each sub-batch (rows PART_ROWS); works: per sub-batch,
    (steps, R, n) seconds each unit attends in a layer of residue rho (0: the unit is not used). `lanes`: each
    unit's timeline lane."""
    n_parts, steps = parts.shape[0], parts.shape[2]
    n = works[0].shape[2]
    durations = np.empty(steps)
    shape = (n_parts, n_layers) if record else (0, 0)
    rec = LayerRecord(list(sub_of), np.full((*shape, len(REC_COLS)), np.nan),
                      np.full((*shape, n if record else 0, 2), np.nan), np.full((n_parts if record else 0, 2), np.nan),
                      lanes)  # fmt: skip
    _clock(n_layers, ranksets, seq, not record, np.asarray(sub_of, np.int64), np.ascontiguousarray(parts),
           works[0], works[-1], durations, rec.layers, rec.ranks, rec.final)  # fmt: skip
    return durations, (rec if record else [])


class LayerRecord(Sequence):
    """A recorded step's device intervals (`Interval`s, layer by layer and part by part as they happened), made
    from its times only when first read: a run records many iterations and keeps a few (metrics.TimelineSample).
    layers: (P, L, len(REC_COLS)); ranks: (P, L, n, start/end), NaN for units not used; final: (P, start/end)
    of each part's last dense work and LM head."""

    def __init__(self, sub_of: list[int], layers: np.ndarray, ranks: np.ndarray, final: np.ndarray, lanes: list[str]):
        self.sub_of, self.layers, self.ranks, self.final, self.lanes = sub_of, layers, ranks, final, lanes
        self._list: list[Interval] | None = None

    def __bool__(self) -> bool:
        return True  # an iteration was recorded

    def __len__(self) -> int:
        return len(self._intervals())

    def __getitem__(self, i):
        return self._intervals()[i]

    def _intervals(self) -> list[Interval]:
        if self._list is not None:
            return self._list
        out: list[Interval] = []

        def note(dev, a, b, label, layer=-1):
            if b > a:
                out.append(Interval(dev, float(a), float(b), label, layer))

        n_parts, n_layers = self.layers.shape[:2]
        for layer in range(n_layers):
            for p in range(n_parts):
                name = "AB"[self.sub_of[p]]
                start, dense_end, gpu_end, up_start, up_end, up_free, dn_start, returned, down_free = (
                    self.layers[p, layer].tolist())
                note("gpu", start, dense_end, f"{name} dense", layer)
                note("gpu", dense_end, gpu_end, f"{name} attn on GPU (prefill, HBM tier)", layer)
                note("pcie_up", up_start, up_end, f"{name} QKV", layer)
                note("pcie_up", up_end, up_free, f"{name} prefill KV", layer)
                if np.isnan(returned):
                    continue
                label, times = f"{name} attn", self.ranks[p, layer]
                for r in np.flatnonzero(~np.isnan(times[:, 0])):
                    note(self.lanes[r], times[r, 0], times[r, 1], label, layer)
                note("pcie_down", dn_start, returned, f"{name} out", layer)
                note("pcie_down", returned, down_free, f"{name} KV to HBM", layer)
        for p in range(n_parts):
            note("gpu", self.final[p, 0], self.final[p, 1], "AB"[self.sub_of[p]] + " dense+head")
        self._list = out
        return out


@numba.njit(cache=True)
def unit_loads(work, stalled, segment, weight0, weight, reps, channels):
    """What a sub-batch's units do in an iteration, per step. `work` and `stalled` (samples, R, n): the seconds
    each unit is occupied by, and blocked by transfers in, one layer of each residue rho (n = channels x R units,
    unit = channel x R + rankset) at the iteration's sampled steps; step s takes sample segment[s] x weight0[s] +
    sample segment[s] + 1 x weight[s] (`StepInterpolation`; one sample: every step is it). Weighted by the layers
    of each residue `reps` and summed over the layers, per step: the slowest unit's time, the mean unit's, the
    slowest / mean working unit's ratio (1 where no unit works), the fraction of units idle, each rankset's mean
    unit time (steps, R), each rankset's mean time blocked by transfers (steps, R) and each unit's time (steps, n);
    and the work at every step (steps, R, n)."""
    n_samples, n_res, n = work.shape
    steps = len(segment)
    full = np.empty((steps, n_res, n))
    slowest, mean, ratio, idle = np.zeros(steps), np.zeros(steps), np.zeros(steps), np.zeros(steps)
    by_rankset, stall, per_unit = np.zeros((steps, n_res)), np.zeros((steps, n_res)), np.zeros((steps, n))
    for s in range(steps):
        i, a, b = segment[s], weight0[s], weight[s]
        for rho in range(n_res):
            k = float(reps[rho])
            top, total, zeros = -np.inf, 0.0, 0
            for u in range(n):
                if n_samples == 1:
                    v, blocked = work[0, rho, u], stalled[0, rho, u]
                else:
                    v = work[i, rho, u] * a + work[i + 1, rho, u] * b
                    blocked = stalled[i, rho, u] * a + stalled[i + 1, rho, u] * b
                full[s, rho, u] = v
                top = max(top, v)
                total += v
                zeros += v == 0.0
                per_unit[s, u] += k * v
                by_rankset[s, u % n_res] += k * v / channels
                stall[s, u % n_res] += k * blocked / channels
            mu = total / n
            slowest[s] += k * top
            mean[s] += k * mu
            ratio[s] += k * (top * (n - zeros) / total if total > 0.0 else 1.0)
            idle[s] += k * zeros / n
    return slowest, mean, ratio, idle, by_rankset, stall, per_unit, full
