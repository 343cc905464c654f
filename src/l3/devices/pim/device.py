"""The DIMM-PIM device as the simulator sees it: capacity, placement and timing of decode attention.

Ranks are numbered channel * R + rankset (R = ranks per channel = ranksets), as in mapping.rank_of. Under the
placement rule, request i's layer l lives in rankset (l + i) mod R at the request's channel position; ranks
work in parallel, layers one after another. Times are in seconds, sizes in bytes, contexts in tokens (the
KV length attended, including the new token).
"""

from __future__ import annotations

import functools

import numpy as np

from l3.devices.pim.energy import COMPONENTS, PimEnergy
from l3.devices.pim.geometry import PimGeometry
from l3.devices.pim.kernels import KernelShape, rank_layer_stream
from l3.devices.pim.measurements import MeasurementStore
from l3.devices.pim.surrogate import PimSurrogate
from l3.devices.pim.timing import CATEGORIES, COUNTS, RankEngine
from l3.specs.dram import DramSpec
from l3.specs.model import ModelSpec
from l3.specs.pim import PimSpec


@functools.lru_cache(maxsize=16)
def _surrogate(dram_json: str, pim_json: str, model_json: str) -> PimSurrogate:
    store = MeasurementStore.open("|".join((dram_json, pim_json, model_json)))
    return PimSurrogate(DramSpec.model_validate_json(dram_json), PimSpec.model_validate_json(pim_json),
                        ModelSpec.model_validate_json(model_json), store)  # fmt: skip


def shared_surrogate(dram: DramSpec, pim: PimSpec, model: ModelSpec) -> PimSurrogate:
    """One surrogate per (DRAM, PU, model) in a process, its measurements kept in the machine's
    `MeasurementStore`: they are the same whoever asks, and they are the costly part of building a device
    (probes, repeated runs and later processes reuse them)."""
    return _surrogate(dram.model_dump_json(), pim.model_dump_json(), model.model_dump_json())


class PimDevice:
    """DIMM-PIM holding one model's KV cache; decode-attention timing from the surrogate (fast) or the
    command-level engine (`engine_layer_attention_time`, for checks)."""

    def __init__(self, dram: DramSpec, pim: PimSpec, model: ModelSpec):
        self.dram, self.pim, self.model = dram, pim, model
        self.geometry = PimGeometry(dram, pim)
        self.shape = KernelShape.build(dram, pim, model)
        self.energy = PimEnergy(dram, pim, self.shape)
        self._tck_s = dram.timing.tck_ns * 1e-9

    @functools.cached_property
    def surrogate(self) -> PimSurrogate:
        """The timing surrogate, built at the first timing query (it measures the engine unless the store holds
        this configuration): a device built to read its capacity or shape measures nothing."""
        return shared_surrogate(self.dram, self.pim, self.model)

    # --- organisation ----------------------------------------------------------------------------
    @property
    def capacity_bytes(self) -> int:
        return self.dram.org.capacity_bytes

    @property
    def n_ranks(self) -> int:
        return self.dram.org.ranks

    @property
    def n_ranksets(self) -> int:
        return self.geometry.ranksets

    @property
    def n_hc(self) -> int:
        """Chips per KV head."""
        return self.shape.n_hc

    @property
    def peak_attention_bw(self) -> float:
        """Peak rate at which attention reads the KV, bytes/s: every bank PU at once; with the KV mapping off no
        bank PU can compute, and all KV crosses the rank PUs' links to their chips."""
        if not self.pim.features.kv_mapping:
            return self.geometry.rank_link_bw * self.dram.org.ranks
        return self.geometry.peak_attention_bw

    @property
    def kv_capacity_tokens(self) -> int:
        """Whole-model tokens (all layers, K and V) that fit when every row stripe is full. A row stripe (one
        row index in every bank of every chip of a rank) holds N_bk * tokens_per_row tokens of one (request,
        layer, head round, K|V); each such region rounds up to whole stripes, so a request wastes under one
        stripe per region."""
        s = self.shape
        stripes = self.n_ranks * self.dram.org.rows
        return stripes * s.n_bk * s.tokens_per_row // (2 * s.rounds * self.model.n_layers)

    def default_channels(self, n_requests: int) -> np.ndarray:
        """Channel position of each request when the caller has none: (i // R) mod channels, which spreads
        consecutive requests over the R ranks of a channel first."""
        return (np.arange(n_requests) // self.n_ranksets) % self.dram.org.channels

    def layer_ranks(self, layer: int, channels: np.ndarray) -> np.ndarray:
        """Rank of each request's `layer` (request i at channel position channels[i])."""
        i = np.arange(len(channels))
        return np.asarray(channels) * self.n_ranksets + (layer + i) % self.n_ranksets

    # --- timing ----------------------------------------------------------------------------------
    def layer_attention_time(self, contexts: np.ndarray, rank: np.ndarray, *, breakdown: bool = False):
        """Seconds each rank spends on one layer's decode attention (array of n_ranks); request i has
        contexts[i] tokens on rank rank[i] (any rank numbering in [0, n_ranks)). Includes the host writing
        each request's Q and new K/V token into the rank and reading its output back; prefill KV writes are
        not included (`kv_write_time`). With `breakdown`, also (n_ranks, categories) seconds."""
        cyc = self.surrogate.rank_cycles(contexts, rank, self.n_ranks) * self._tck_s
        return (cyc.sum(axis=1), cyc) if breakdown else cyc.sum(axis=1)

    def layer_attention(self, contexts: np.ndarray, rank: np.ndarray, dynamic: bool = False,
                        n_ranks: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
        """`layer_attention_time` with its breakdown (seconds per rank; (n_ranks, categories)) and each rank's
        energy while it works, (n_ranks, energy.COMPONENTS) joules (`dynamic`: above the ranks' static power,
        see PimEnergy.of). `n_ranks`: how many ranks `rank` numbers (default: the device's; more lets a caller
        ask for several layouts in one call, each on ranks of its own)."""
        cyc, counts, refreshes = self.surrogate.rank_work(contexts, rank, n_ranks or self.n_ranks)
        total = cyc.sum(axis=1)
        return total * self._tck_s, cyc * self._tck_s, self.energy.of(counts, total, refreshes, dynamic)

    def step_attention_energy(self, contexts: np.ndarray, channels: np.ndarray | None = None) -> dict:
        """Energy of the whole device over one decode step (`step_attention_time`'s `max`), joules by
        energy.COMPONENTS: each layer's working ranks, and every rank idle for the rest of the step."""
        contexts = np.asarray(contexts, dtype=np.int64)
        channels = self.default_channels(len(contexts)) if channels is None else np.asarray(channels)
        r, n_layers = self.n_ranksets, self.model.n_layers
        busy_s, total = 0.0, np.zeros(len(COMPONENTS))
        for pattern in range(min(r, n_layers)):  # layer l and l + R load the ranks identically
            count = len(range(pattern, n_layers, r))
            t, _, e = self.layer_attention(contexts, self.layer_ranks(pattern, channels))
            busy_s += count * t.sum()
            total += count * e.sum(axis=0)
        step = self.step_attention_time(contexts, channels)["max"]
        total += self.energy.idle(self.n_ranks * step - busy_s)
        return dict(zip(COMPONENTS, total.tolist(), strict=True))

    def step_attention_time(self, contexts: np.ndarray, channels: np.ndarray | None = None) -> dict:
        """One decode step over all layers. Returns seconds: `max` (sum over layers of the slowest rank: the
        step's attention time), `mean` (sum over layers of the mean over all ranks) and `breakdown` (the
        slowest rank's categories, summed over layers; sums to `max`)."""
        contexts = np.asarray(contexts, dtype=np.int64)
        channels = self.default_channels(len(contexts)) if channels is None else np.asarray(channels)
        r, n_layers = self.n_ranksets, self.model.n_layers
        total_max, total_mean, bd = 0.0, 0.0, np.zeros(len(CATEGORIES))
        for pattern in range(min(r, n_layers)):  # layer l and l + R load the ranks identically
            count = len(range(pattern, n_layers, r))
            t, cat = self.layer_attention_time(contexts, self.layer_ranks(pattern, channels), breakdown=True)
            k = int(np.argmax(t))
            total_max += count * t[k]
            total_mean += count * t.mean()
            bd += count * cat[k]
        return {"max": total_max, "mean": total_mean, "breakdown": dict(zip(CATEGORIES, bd.tolist(), strict=True))}

    def uniform_step_time(self, batch: np.ndarray, context: np.ndarray) -> np.ndarray:
        """Step attention time (s) of `batch` requests of `context` tokens each, default placement (the
        busiest rank holds ceil(batch / n_ranks) requests in every layer); vectorised over queries."""
        n = -(-np.asarray(batch, dtype=np.int64) // self.n_ranks)
        return self.surrogate.uniform_cycles(n, context) * self._tck_s * self.model.n_layers

    def kv_write_time(self, tokens: np.ndarray | int, layers: int | None = None) -> np.ndarray | float:
        """Seconds to write `tokens` tokens' K and V of `layers` layers (default: all) through one channel
        (a request's KV always sits behind one channel position) at the channel's peak bandwidth. In-flight
        re-layout is free; without it the host CPU reads the bytes back and rewrites them (3 bus passes), and
        permutes them in between at the channel's share of `host_relayout_bw`."""
        layers = self.model.n_layers if layers is None else layers
        kv = np.asarray(tokens) * layers * self.model.kv_bytes_per_token_layer
        t = kv * self.shape.host_passes / self.dram.channel_peak_bw
        if self.shape.host_passes > 1:
            t = t + kv / (self.pim.host_relayout_bw / self.dram.org.channels)
        return t

    def kv_write_energy(self, tokens: np.ndarray | float, layers: int | None = None,
                        dynamic: bool = False) -> np.ndarray:  # fmt: skip
        """Energy (..., energy.COMPONENTS) of writing `tokens` tokens' K and V of `layers` layers (default: all)
        into one rank's share, as `kv_write_time` times it: one rank-wide burst per line (without in-flight
        re-layout: written, read back, re-laid out by the host CPUs, rewritten), a row activation per page
        stripe filled, and standby while the writes take the bus."""
        layers = self.model.n_layers if layers is None else layers
        kv = np.asarray(tokens, float) * layers * self.model.kv_bytes_per_token_layer
        bursts = kv / self.shape.line_bytes
        counts = np.zeros((*kv.shape, len(COUNTS)))
        counts[..., COUNTS.index("write")] = bursts * (1 if self.shape.host_passes == 1 else 2)
        counts[..., COUNTS.index("read")] = bursts * (self.shape.host_passes > 1)
        counts[..., COUNTS.index("act")] = kv / (self.shape.page_bytes * self.dram.org.chips_per_rank)
        counts[..., COUNTS.index("host_bytes")] = kv * (self.shape.host_passes > 1)
        return self.energy.of(counts, np.asarray(self.kv_write_time(tokens, layers)) / self._tck_s, 0.0, dynamic)

    def engine_layer_attention_time(self, contexts: np.ndarray, rank: np.ndarray) -> tuple[np.ndarray, list]:
        """The command-level engine's answer for `layer_attention_time`: (seconds per rank, per-rank
        EngineResult or None for idle ranks). Slow: for checks."""
        contexts, rank = np.asarray(contexts), np.asarray(rank)
        engine = RankEngine(self.dram, self.pim)
        out, results, cache = np.zeros(self.n_ranks), [None] * self.n_ranks, {}
        for k in np.unique(rank):
            key = tuple(int(c) for c in contexts[rank == k])
            if key not in cache:
                cache[key] = engine.run(rank_layer_stream(self.shape, key), serial=self.shape.serial)
            results[k] = cache[key]
            out[k] = cache[key].seconds
        return out, results
