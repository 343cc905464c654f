"""L3: GPUs run weights and dense layers; the KV cache and decode attention live in DIMM-PIM.

One replica's iteration (per layer, per sub-batch X in {A, B}):
  GPU: [post-attention of layer l-1] + QKV projection  -> PCIe up: the decode tokens' Q, K, V
  PIM: decode attention of X's requests on their ranks  -> PCIe down: attention output
  GPU: prefill attention of X's chunks (concurrently with PIM); the next layer's work waits for both.
With `coordination.pipeline`, the GPU runs one sub-batch's dense work while the PIM serves the other's
attention (NeuPIMs-style interleaving); without it every part runs back to back (the plain sum of parts).

Placement (docs/l3-system.md): at admission a request gets a slot: a group of S channels and an offset o. Its
layer l lives in rankset (l + o) mod R, its KV heads split evenly over the S ranks of that rankset in the
group's channels (S = 1 with `placement = "rank"`). Layers rotate over all ranksets; requests sharing a slot
share ranks in every layer. A write into a rank blocks that rank's compute
(`rankset_overlap`); without rankset overlap it blocks every rank of its channel. DP replicas each own an
equal share of the channels.
"""

from __future__ import annotations

import functools

import numpy as np

from l3.devices.gpu import GpuCostModel
from l3.devices.pim.device import PimDevice
from l3.devices.pim.timing import CATEGORIES
from l3.sim.plan import BatchShape, Plan
from l3.sim.requests import RequestTable
from l3.specs.dram import DramSpec
from l3.specs.system import Deployment
from l3.systems.base import Interval, IterationTiming, SystemModel

BULK_SAMPLE_EVERY = 256  # steps between exact PIM evaluations in a multi-step run (linear in between)
WAIT_THRESHOLD = 0.05  # a side "waited" in an iteration if it idled more than this fraction of it


class L3System(SystemModel):
    def __init__(self, dep: Deployment):
        self.dep = dep
        m, sysspec = dep.model, dep.system
        self.gpu = GpuCostModel(m, dep.gpu, dep.tp, dep.nvlink, sysspec.gpu.model)
        full = sysspec.pim.dram()
        self.channels = full.org.channels // dep.dp  # this replica's share of the host's channels
        self.dram = DramSpec(timing=full.timing, org=full.org.model_copy(update={"channels": self.channels}))
        self.coord = sysspec.coordination
        self.shard = self._shard(PimDevice(self.dram, sysspec.pim.pu, m).n_hc)
        # The device model of one rank's share of a request-layer: n_kv_heads / shard KV heads.
        share = m.model_copy(update={"n_heads": m.n_heads // self.shard, "n_kv_heads": m.n_kv_heads // self.shard})
        self.pim = PimDevice(self.dram, sysspec.pim.pu, share)
        self.ranksets = self.dram.org.ranks_per_channel
        self.n_ranks = self.ranksets * self.channels
        self._slot_ranks = [self.ranks_of(np.arange(self.slots), rho) for rho in range(self.ranksets)]
        self._gpu_parts = functools.lru_cache(maxsize=4096)(self._gpu_parts_uncached)
        self.devices = ("gpu", "pim", "pcie_up", "pcie_down", *(f"rankset{s}" for s in range(self.ranksets)))
        # Bytes per token per layer crossing PCIe.
        self._qkv_bytes = (m.q_dim + 2 * m.kv_dim) * m.dtype_bytes
        self._out_bytes = m.q_dim * m.dtype_bytes
        self._kv_layer = m.kv_bytes_per_token_layer
        self._host_cats = [CATEGORIES.index("host_write"), CATEGORIES.index("host_read")]

    def _shard(self, n_hc: int) -> int:
        """Channels a request-layer's heads are split over: the largest divisor S of the channels such that
        each rank still gets whole chip groups (chips / N_hc heads per round) of heads."""
        if self.coord.placement == "rank":
            return 1
        m, chips = self.dep.model, self.dram.org.chips_per_rank
        group = chips // n_hc
        fits = [s for s in range(2, self.channels + 1)
                if self.channels % s == 0 and m.n_kv_heads % s == 0 and (m.n_kv_heads // s) % group == 0]
        return max(fits, default=1)

    @property
    def kv_capacity_tokens(self) -> int:
        """Whole-model tokens: the share model's capacity over all ranks, divided by the shards of a token."""
        return int(self.pim.kv_capacity_tokens // self.shard)

    @property
    def attention_bw(self) -> float:
        """Bank-level read bandwidth of the replica's ranks."""
        return self.pim.peak_attention_bw

    # --- links ---------------------------------------------------------------------------------------
    def pcie(self, nbytes: float) -> float:
        """One transfer split over the TP group's PCIe links (one per GPU), seconds."""
        return float(self.dep.host_link.transfer_time(nbytes / self.dep.tp)) if nbytes > 0 else 0.0

    # --- memory side --------------------------------------------------------------------------------
    @property
    def slots(self) -> int:
        """Placement slots: a channel group (S channels) and a rankset offset: group * R + offset."""
        return self.channels // self.shard * self.ranksets

    def ranks_of(self, slot: np.ndarray, residue: int) -> np.ndarray:
        """Ranks (channel * R + rankset, the device's numbering) holding layer `residue` (mod R) of requests
        at `slot`: rankset (offset + residue) mod R in each of the slot's S channels. Shape (..., S)."""
        R, S = self.ranksets, self.shard
        slot = np.asarray(slot)
        channels = (slot // R)[..., None] * S + np.arange(S)
        return channels * R + ((slot % R + residue) % R)[..., None]

    def pim_layer_work(self, ids, ctx, placement, pre_ids, pre_tokens, pre_place, offsets) -> np.ndarray:
        """Seconds each rank is occupied by one layer's attention of a sub-batch: (offsets, R residues, ranks).

        ctx: tokens attended per decode request at step offset 0 (grows by one per step). The device's rank
        time includes writing each request's Q and new K/V token and reading its output back; prefill
        requests `pre_ids` also write `pre_tokens` tokens of KV per layer into their ranks in the same slot.
        With rankset overlap a write blocks only the rank written; without it, every rank of its channel.
        """
        R, C, n, k = self.ranksets, self.channels, self.n_ranks, self.slots
        # Requests sharing a slot share their ranks in every layer, and each of the slot's S ranks holds the
        # same share of their heads; layer residue rho only moves a slot to other ranks of the same channels.
        pre_w = np.zeros(k)
        if len(pre_ids):
            tokens = np.bincount(pre_place, weights=pre_tokens, minlength=k)
            pre_w = np.asarray(self.pim.kv_write_time(tokens, layers=1), float)
        work = np.zeros((len(offsets), R, n))
        for si, j in enumerate(offsets):
            comp, host = np.zeros(k), np.zeros(k)
            if len(ids):
                comp, cat = self.pim.layer_attention_time(ctx + j, placement, breakdown=True)
                comp, host = comp[:k], cat[:k, self._host_cats].sum(axis=1)
            for rho in range(R):
                ranks = self._slot_ranks[rho]  # (k, S)
                comp_r, host_r, pre_r = (np.zeros(n) for _ in range(3))
                comp_r[ranks] = comp[:, None]
                host_r[ranks] = host[:, None]
                pre_r[ranks] = pre_w[:, None]
                if self.coord.rankset_overlap:
                    work[si, rho] = comp_r + pre_r
                else:  # every write blocks all ranks of its channel
                    channel_writes = np.repeat((host_r + pre_r).reshape(C, R).sum(axis=1), R)
                    work[si, rho] = np.where(comp_r + pre_r > 0, comp_r - host_r + channel_writes, 0.0)
        return work

    # --- the iteration --------------------------------------------------------------------------------
    def run(self, plan: Plan, table: RequestTable, steps: int, record: bool = False) -> IterationTiming:
        L = self.dep.model.n_layers
        offsets = np.unique(np.linspace(0, steps - 1, 2 + (steps - 1) // BULK_SAMPLE_EVERY).round().astype(int))
        subs = []
        for s in (0, 1):
            sb = plan.sub_batch(s)
            if sb.empty:
                continue
            ctx = table.context(sb.decode_ids).astype(float)
            shape = BatchShape.of(sb, ctx)
            work = self.pim_layer_work(sb.decode_ids, ctx, table.placement[sb.decode_ids], sb.prefill_ids,
                                       sb.prefill_chunks, table.placement[sb.prefill_ids], offsets)  # fmt: skip
            subs.append({"s": s, "n_dec": len(sb.decode_ids), "work": interpolate_steps(work, offsets, steps),
                         **self._gpu_parts(shape.n_tokens, shape.n_decode, shape.prefill_tokens,
                                           shape.prefill_pairs, shape.prefill_kv_tokens, shape.n_sampled)})
        return self._schedule(subs, L, steps, record)

    def _gpu_parts_uncached(self, n_tokens, n_decode, prefill_tokens, pairs, kv_tokens, n_sampled) -> dict:
        """Per-layer GPU and PCIe seconds of a sub-batch (the same shapes recur: cached)."""
        layer = self.gpu.layer(n_tokens, 0, 0.0, pairs, kv_tokens)
        return {"pre": float(layer.pre_attn), "pattn": float(layer.prefill_attn), "post": float(layer.post_attn),
                "head": float(self.gpu.lm_head(n_sampled)), "up": self.pcie(n_decode * self._qkv_bytes),
                "up_bg": self.pcie(prefill_tokens * self._kv_layer), "down": self.pcie(n_decode * self._out_bytes)}

    def _schedule(self, subs: list[dict], L: int, steps: int, record: bool) -> IterationTiming:
        """Run the per-layer dependency graph on the GPU, the PCIe directions and every rank (vectorised over
        steps). Each rank serves one sub-batch's layer after another; different ranks run concurrently.

        The graph repeats every R layers (the rankset rotation). Once two consecutive periods advance every
        resource by the same amount, the schedule is periodic (all updates are max-plus: max and +), so the
        remaining whole periods are added in one step; the result is exactly that of running them.
        """
        R, n = self.ranksets, self.n_ranks
        zero = np.zeros(steps)
        free = {"gpu": zero, "up": zero, "down": zero, "ranks": np.zeros((steps, n))}
        for x in subs:
            free[f"ret{x['s']}"] = zero
        intervals: list[Interval] = []
        seq = not self.coord.pipeline
        used = np.zeros(n, bool)
        for x in subs:
            used |= (x["work"] > 0).any(axis=(0, 1))

        def barrier(t):  # without the pipeline every part waits for all earlier parts
            if seq:
                free.update(gpu=t, up=t, down=t, ranks=np.repeat(t[:, None], n, axis=1))

        def note(dev, a, b, label, layer=-1):
            if record and float(b[0]) > float(a[0]):
                intervals.append(Interval(dev, float(a[0]), float(b[0]), label, layer))

        note.record = record

        def core() -> np.ndarray:  # the resource times that feed later decisions
            cols = [free["gpu"], free["up"], free["down"]] + [free[f"ret{x['s']}"] for x in subs]
            return np.column_stack([*cols, free["ranks"][:, used]])

        layer, last, last_delta = 0, None, None
        while layer < L:
            if layer % R == 0 and not record:
                now = core()
                if last is not None:
                    delta = now - last
                    uniform = np.ptp(delta, axis=1) <= 1e-12 * np.abs(delta).max(initial=1.0)
                    if last_delta is not None and uniform.all() and np.allclose(delta, last_delta, rtol=1e-12):
                        m = (L - layer) // R
                        shift = m * delta[:, 0]
                        for k in free:
                            free[k] = free[k] + (shift[:, None] if free[k].ndim == 2 else shift)
                        layer += m * R
                        last = None
                        if layer >= L:
                            break
                    last_delta = delta
                last = now
            for x in subs:
                self._layer(x, layer, free, barrier, note, seq)
            layer += 1
        gpu_free = free["gpu"]
        for x in subs:
            start = np.maximum(gpu_free, free[f"ret{x['s']}"])
            gpu_free = start + x["post"] + x["head"]
            note("gpu", start, gpu_free, "AB"[x["s"]] + " dense+head")
        durations = np.maximum(gpu_free, np.maximum(free["up"], free["down"]))
        return self._timing(subs, L, steps, durations, intervals)

    def _layer(self, x: dict, layer: int, free: dict, barrier, note, seq: bool) -> None:
        """One layer of one sub-batch: dense work, Q/K/V up, attention on its ranks, output down."""
        s, name, R = x["s"], "AB"[x["s"]], self.ranksets
        start = np.maximum(free["gpu"], free[f"ret{s}"])
        dense_end = start + (x["post"] if layer else 0.0) + x["pre"]
        free["gpu"] = dense_end + x["pattn"]
        note("gpu", start, dense_end, f"{name} dense", layer)
        note("gpu", dense_end, free["gpu"], f"{name} prefill attn", layer)
        barrier(free["gpu"])
        up_start = np.maximum(dense_end if not seq else free["gpu"], free["up"])
        up_end = up_start + x["up"]
        free["up"] = up_end + x["up_bg"]
        note("pcie_up", up_start, up_end, f"{name} QKV", layer)
        note("pcie_up", up_end, free["up"], f"{name} prefill KV", layer)
        barrier(free["up"])
        work = x["work"][:, layer % R, :]
        active = work > 0
        if not active.any():
            free[f"ret{s}"] = free["gpu"]
            return
        ready = (up_end if not seq else free["up"])[:, None]
        r_start = np.maximum(free["ranks"], ready)
        r_end = r_start + work
        free["ranks"] = np.where(active, r_end, free["ranks"])
        pim_end = np.max(np.where(active, r_end, ready), axis=1)
        if note.record:
            for r in np.flatnonzero(active[0]):
                note(f"rankset{r % R}/rank{r}", r_start[:, r], r_end[:, r], f"{name} attn", layer)
        barrier(pim_end)
        dn_start = np.maximum(pim_end, free["down"])
        free[f"ret{s}"] = free["down"] = dn_start + x["down"]
        note("pcie_down", dn_start, free["down"], f"{name} out", layer)
        barrier(free["down"])

    def _timing(self, subs, L, steps, durations, intervals) -> IterationTiming:
        R, C = self.ranksets, self.channels
        reps = np.bincount(np.arange(L) % R, minlength=R)  # layers per residue
        gpu_sub, mem_sub = np.zeros((steps, 2)), np.zeros((steps, 2))
        busy = {d: np.zeros(steps) for d in self.devices}
        imb_sum, imb_n = np.zeros(steps), 0
        for x in subs:
            g = L * (x["pre"] + x["pattn"] + x["post"]) + x["head"]
            gpu_sub[:, x["s"]] = g
            busy["gpu"] += g
            busy["pcie_up"] += L * (x["up"] + x["up_bg"])
            busy["pcie_down"] += L * x["down"]
            # The sub-batch's own PIM time: each layer's slowest rank (what the scheduler balances against
            # the other sub-batch's GPU time). Busy time of `pim` and of each rankset: the mean over their
            # ranks of the time each rank computed (a rank is a serial resource, so this is <= elapsed time).
            mem_sub[:, x["s"]] = x["work"].max(axis=2) @ reps
            if x["n_dec"]:
                w = x["work"]  # (steps, R, ranks); rank = channel * R + rankset
                busy["pim"] += w.mean(axis=2) @ reps
                by_rankset = w.reshape(steps, R, C, R).mean(axis=2)
                for q in range(R):
                    busy[f"rankset{q}"] += by_rankset[:, :, q] @ reps
                mean = w.mean(axis=2)
                ratio = np.where(mean > 0, w.max(axis=2) / np.where(mean > 0, mean, 1.0), 1.0)
                imb_sum += ratio @ reps
                imb_n += L
        stats = {
            "imbalance": imb_sum / imb_n if imb_n else np.ones(steps),
            "gpu_waited": (durations - busy["gpu"] > WAIT_THRESHOLD * durations).astype(float),
            "pim_waited": ((durations - mem_sub.sum(axis=1) > WAIT_THRESHOLD * durations)
                           & (mem_sub.sum(axis=1) > 0)).astype(float),
        }
        return IterationTiming(durations, busy, gpu_sub, mem_sub, stats, intervals)


def interpolate_steps(values: np.ndarray, offsets: np.ndarray, steps: int) -> np.ndarray:
    """Values known at step `offsets` (first axis), linearly interpolated to every step 0..steps-1."""
    if steps == 1:
        return values
    k = np.arange(steps)
    i = np.clip(np.searchsorted(offsets, k, side="right") - 1, 0, len(offsets) - 2)
    w = ((k - offsets[i]) / (offsets[i + 1] - offsets[i])).reshape(-1, *([1] * (values.ndim - 1)))
    return values[i] * (1 - w) + values[i + 1] * w
