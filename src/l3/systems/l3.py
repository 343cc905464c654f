"""L3: GPUs run weights and dense layers; the KV cache and decode attention live in DIMM-PIM.

One replica's iteration (per layer, per sub-batch X in {A, B}):
  GPU: [post-attention of layer l-1] + QKV projection  -> PCIe up: the decode tokens' Q, K, V
  PIM: decode attention of X's requests on their ranks  -> PCIe down: attention output
  GPU: prefill attention of X's chunks (concurrently with PIM); the next layer's work waits for both.
With `coordination.pipeline`, the GPU runs one sub-batch's dense work while the PIM serves the other's
attention (NeuPIMs-style interleaving); without it every part runs back to back (the plain sum of parts).

Placement (docs/l3-system.md): at admission a request gets a slot (a channel c and an offset o, one slot per
rank); its layer l lives in rankset (l + o) mod R of channel c, so its layers rotate over all ranksets and
requests sharing a slot share a rank in every layer. A write into a rank blocks that rank's compute
(`rankset_overlap`); without rankset overlap it blocks every rank of its channel. DP replicas each own an
equal share of the channels.
"""

from __future__ import annotations

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
        self.pim = PimDevice(self.dram, sysspec.pim.pu, m)
        self.ranksets = self.dram.org.ranks_per_channel
        self.n_ranks = self.ranksets * self.channels
        self.coord = sysspec.coordination
        self.devices = ("gpu", "pim", "pcie_up", "pcie_down", *(f"rankset{s}" for s in range(self.ranksets)))
        # Bytes per token per layer crossing PCIe.
        self._qkv_bytes = (m.q_dim + 2 * m.kv_dim) * m.dtype_bytes
        self._out_bytes = m.q_dim * m.dtype_bytes
        self._kv_layer = m.kv_bytes_per_token_layer
        self._host_cats = [CATEGORIES.index("host_write"), CATEGORIES.index("host_read")]

    @property
    def kv_capacity_tokens(self) -> int:
        return int(self.pim.kv_capacity_tokens)

    # --- links ---------------------------------------------------------------------------------------
    def pcie(self, nbytes: float) -> float:
        """One transfer split over the TP group's PCIe links (one per GPU), seconds."""
        return float(self.dep.host_link.transfer_time(nbytes / self.dep.tp)) if nbytes > 0 else 0.0

    # --- memory side --------------------------------------------------------------------------------
    @property
    def slots(self) -> int:
        """Placement slots: a channel and a rankset offset (channel * R + offset), one per rank."""
        return self.n_ranks

    def rank_of(self, ids: np.ndarray, placement: np.ndarray, residue: int) -> np.ndarray:
        """Rank (channel * R + rankset, the device's numbering) holding layer `residue` (mod R) of each request
        placed at slot `placement` (channel * R + offset): rankset (layer + offset) mod R of its channel."""
        R = self.ranksets
        return placement // R * R + (placement % R + residue) % R

    def pim_layer_work(self, ids, ctx, placement, pre_ids, pre_tokens, pre_place, offsets) -> np.ndarray:
        """Seconds each rank is occupied by one layer's attention of a sub-batch: (offsets, R residues, ranks).

        ctx: tokens attended per decode request at step offset 0 (grows by one per step). The device's rank
        time includes writing each request's Q and new K/V token and reading its output back; prefill
        requests `pre_ids` also write `pre_tokens` tokens of KV per layer into their ranks in the same slot.
        With rankset overlap a write blocks only the rank written; without it, every rank of its channel.
        """
        R, C, n = self.ranksets, self.channels, self.n_ranks
        work = np.zeros((len(offsets), R, n))
        for rho in range(R):
            pre_w = np.zeros(n)
            if len(pre_ids):
                tokens = np.bincount(self.rank_of(pre_ids, pre_place, rho), weights=pre_tokens, minlength=n)
                pre_w = np.asarray(self.pim.kv_write_time(tokens, layers=1), float)
            ranks = self.rank_of(ids, placement, rho)
            for si, j in enumerate(offsets):
                comp, host = np.zeros(n), np.zeros(n)
                if len(ids):
                    comp, cat = self.pim.layer_attention_time(ctx + j, ranks, breakdown=True)
                    host = cat[:, self._host_cats].sum(axis=1)
                if self.coord.rankset_overlap:
                    work[si, rho] = comp + pre_w
                else:
                    channel_writes = np.repeat((host + pre_w).reshape(C, R).sum(axis=1), R)
                    work[si, rho] = np.where(comp + pre_w > 0, comp - host + channel_writes, 0.0)
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
            layer = self.gpu.layer(shape.n_tokens, 0, 0.0, shape.prefill_pairs, shape.prefill_kv_tokens)
            work = self.pim_layer_work(sb.decode_ids, ctx, table.placement[sb.decode_ids], sb.prefill_ids,
                                       sb.prefill_chunks, table.placement[sb.prefill_ids], offsets)  # fmt: skip
            subs.append({
                "s": s, "n_dec": len(sb.decode_ids), "pre": float(layer.pre_attn), "pattn": float(layer.prefill_attn),
                "post": float(layer.post_attn), "head": float(self.gpu.lm_head(shape.n_sampled)),
                "up": self.pcie(len(sb.decode_ids) * self._qkv_bytes),
                "up_bg": self.pcie(shape.prefill_tokens * self._kv_layer),
                "down": self.pcie(len(sb.decode_ids) * self._out_bytes),
                "work": interpolate_steps(work, offsets, steps),
            })  # fmt: skip
        return self._schedule(subs, L, steps, record)

    def _schedule(self, subs: list[dict], L: int, steps: int, record: bool) -> IterationTiming:
        """Run the per-layer dependency graph on the GPU, the PCIe directions and every rank (vectorised over
        steps). Each rank serves one sub-batch's layer after another; different ranks run concurrently."""
        R, n = self.ranksets, self.n_ranks
        zero = np.zeros(steps)
        gpu_free, up_free, down_free = zero, zero, zero
        rank_free = np.zeros((steps, n))
        ret = {x["s"]: zero for x in subs}
        intervals: list[Interval] = []
        seq = not self.coord.pipeline
        span = {x["s"]: zero for x in subs}  # PIM seconds from a layer's first rank start to its last rank end

        def barrier(t):  # without the pipeline every part waits for all earlier parts
            nonlocal gpu_free, up_free, down_free, rank_free
            if seq:
                gpu_free = up_free = down_free = t
                rank_free = np.repeat(t[:, None], n, axis=1)

        def note(dev, a, b, label, layer=-1):
            if record and float(b[0]) > float(a[0]):
                intervals.append(Interval(dev, float(a[0]), float(b[0]), label, layer))

        for layer in range(L):
            for x in subs:
                name = "AB"[x["s"]]
                start = np.maximum(gpu_free, ret[x["s"]])
                dense_end = start + (x["post"] if layer else 0.0) + x["pre"]
                gpu_free = dense_end + x["pattn"]
                note("gpu", start, dense_end, f"{name} dense", layer)
                note("gpu", dense_end, gpu_free, f"{name} prefill attn", layer)
                barrier(gpu_free)
                up_start = np.maximum(dense_end if not seq else gpu_free, up_free)
                up_end = up_start + x["up"]
                up_free = up_end + x["up_bg"]
                note("pcie_up", up_start, up_end, f"{name} QKV", layer)
                note("pcie_up", up_end, up_free, f"{name} prefill KV", layer)
                barrier(up_free)
                work = x["work"][:, layer % R, :]
                active = work > 0
                if not active.any():
                    ret[x["s"]] = gpu_free
                    continue
                ready = up_end if not seq else up_free
                r_start = np.maximum(rank_free, ready[:, None])
                r_end = r_start + work
                rank_free = np.where(active, r_end, rank_free)
                pim_end = np.max(np.where(active, r_end, ready[:, None]), axis=1)
                span[x["s"]] = span[x["s"]] + pim_end - np.min(np.where(active, r_start, np.inf), axis=1)
                if record:
                    for r in np.flatnonzero(active[0]):
                        note(f"rank{r}", r_start[:, r], r_end[:, r], f"{name} attn", layer)
                barrier(pim_end)
                dn_start = np.maximum(pim_end, down_free)
                ret[x["s"]] = down_free = dn_start + x["down"]
                note("pcie_down", dn_start, down_free, f"{name} out", layer)
                barrier(down_free)
        for x in subs:
            start = np.maximum(gpu_free, ret[x["s"]])
            gpu_free = start + x["post"] + x["head"]
            note("gpu", start, gpu_free, "AB"[x["s"]] + " dense+head")
        durations = np.maximum(gpu_free, np.maximum(up_free, down_free))
        return self._timing(subs, L, steps, durations, span, intervals)

    def _timing(self, subs, L, steps, durations, span, intervals) -> IterationTiming:
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
            mem_sub[:, x["s"]] = span[x["s"]]
            busy["pim"] += span[x["s"]]
            if x["n_dec"]:
                w = x["work"]  # (steps, R, ranks); rank = channel * R + rankset
                by_rankset = w.reshape(steps, R, C, R).max(axis=2)  # slowest rank of each rankset
                for q in range(R):
                    busy[f"rankset{q}"] += by_rankset[:, :, q] @ reps
                mean = w.mean(axis=2)
                ratio = np.where(mean > 0, w.max(axis=2) / np.where(mean > 0, mean, 1.0), 1.0)
                imb_sum += ratio @ reps
                imb_n += L
        stats = {
            "imbalance": imb_sum / imb_n if imb_n else np.ones(steps),
            "gpu_waited": (durations - busy["gpu"] > WAIT_THRESHOLD * durations).astype(float),
            "pim_waited": ((durations - busy["pim"] > WAIT_THRESHOLD * durations) & (busy["pim"] > 0)).astype(float),
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
