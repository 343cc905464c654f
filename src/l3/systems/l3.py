"""L3: GPUs run weights and dense layers; the KV cache and decode attention live in DIMM-PIM.

The iteration graph (sub-batches, PCIe, pipelining) is `AttentionOffloadSystem`'s; here the memory side is the
DIMM-PIM device, its units are ranks, and a layer's attention time per rank comes from the device model.

Placement (docs/l3-system.md): at admission a request gets a slot: a group of S channels and an offset o. Its
layer l lives in rankset (l + o) mod R, its KV heads split evenly over the S ranks of that rankset in the
group's channels (S = 1 with `placement = "rank"`). Layers rotate over all ranksets; requests sharing a slot
share ranks in every layer. With `placement = "striped"` (l3-plus, docs/l3-plus.md) a request's slot is only
where it starts: its tokens are cut into chunks of `chunk_tokens` rotating over the slots (`spread`), and every
slot holding some of them returns a partial attention that the GPU or the host merges. A write into a rank
blocks that rank's compute (`rankset_overlap`); without rankset overlap it blocks every rank of its channel. DP
replicas each own an equal share of the channels; with `pim.shared` (l3-plus) the pool is one, every channel
serves every request, and each iteration's work is dealt over the DP groups of GPUs (`groups`).
"""

from __future__ import annotations

import numpy as np

from l3.devices.pim.device import PimDevice
from l3.devices.pim.energy import COMPONENTS
from l3.devices.pim.geometry import PimGeometry
from l3.devices.pim.timing import CATEGORIES
from l3.specs.dram import DramSpec
from l3.specs.hardware import get_cpu, get_link
from l3.specs.system import Deployment
from l3.systems.offload import AttentionOffloadSystem


class L3System(AttentionOffloadSystem):
    def __init__(self, dep: Deployment):
        m, sysspec = dep.model, dep.system
        full = sysspec.pim.dram()
        self.groups = dep.dp if sysspec.pim.shared else 1
        channels = full.org.channels // (dep.dp // self.groups)  # this replica's share of the host's channels
        self.dram = DramSpec(timing=full.timing, org=full.org.model_copy(update={"channels": channels}))
        super().__init__(dep, self.dram.org.ranks_per_channel, channels)
        self.shard = self._shard(PimGeometry(self.dram, sysspec.pim.pu).n_hc(m.head_dim, m.gqa_group))
        # The device model of one rank's share of a request-layer: n_kv_heads / shard KV heads.
        share = m.model_copy(update={"n_heads": m.n_heads // self.shard, "n_kv_heads": m.n_kv_heads // self.shard})
        self.pim = PimDevice(self.dram, sysspec.pim.pu, share)
        # ranks holding layer residue rho of each slot, (R, slots, S), and rho's index to scatter with
        self._slot_ranks = np.stack([self.ranks_of(np.arange(self.slots), rho) for rho in range(self.ranksets)])
        self._residue_rows = np.arange(self.ranksets)[:, None, None]
        pim = sysspec.pim  # CXL expanders: (link, this replica's devices), each holding whole channels
        self.cxl = None if pim.attach == "dimm" else (
            get_link(pim.cxl_link), max(1, pim.cxl_devices * channels // full.org.channels))  # fmt: skip
        self._host_cats = [CATEGORIES.index("host_write"), CATEGORIES.index("host_read")]
        self.striped = self.coord.placement == "striped"
        if self.striped and self.coord.chunk_order == "least-loaded":
            self.decided_stripe = self.stripe_slots
        # A partial: the unnormalised output (FP32, it is not bounded by |v|) and a running max and sum per
        # query head (FP32); a whole output: FP16 per query head.
        self._partial_bytes = m.n_heads * (m.head_dim + 2) * 4
        host = get_cpu(sysspec.pim.host_cpu)
        self._host_flops = host.peak_flops / self.replicas  # this replica's share
        self.host_merge_w = host.tdp_w / self.replicas

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
        """Whole-model tokens: the share model's capacity over all ranks, divided by the shards of a token (plus
        the HBM tier's under asymmetric pipelining)."""
        return sum(self.kv_tiers)

    @property
    def kv_tiers(self) -> tuple[int, ...]:
        """(PIM) or, under `coordination.asymmetric`, (the GPUs' spare HBM, PIM): sched.kv's HBM_TIER, DEVICE_TIER."""
        pim = int(self.pim.kv_capacity_tokens // self.shard)
        return (self.dep.hbm_kv_tokens, pim) if self.coord.asymmetric else (pim,)

    @property
    def attention_bw(self) -> float:
        """Bank-level read bandwidth of the replica's ranks."""
        return self.pim.peak_attention_bw

    def pcie(self, nbytes):
        """A transfer between the GPUs and the PIM: over the GPUs' host links, and with `pim.attach = "cxl"`
        then over the replica's expanders' CXL links (bytes spread evenly over them, one link latency), seconds."""
        t = super().pcie(nbytes)
        if self.cxl is None:
            return t
        link, devices = self.cxl
        cxl = link.transfer_time(np.asarray(nbytes, float) / devices)
        return t + (float(cxl) if cxl.ndim == 0 else cxl)

    @property
    def link_j_per_byte(self) -> float:
        return super().link_j_per_byte + (self.cxl[0].pj_per_bit * 8e-12 if self.cxl is not None else 0.0)

    def static_power(self) -> dict[str, float]:
        """The GPUs' static power and every rank's standby and refresh."""
        return super().static_power() | {"dram_background": self.n_ranks * self.pim.energy.static_w}

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

    @property
    def _stripe_positions(self) -> int:
        """D: the slots a striped request-layer's chunks rotate over."""
        groups = self.channels // self.shard
        return groups if self.coord.stripe_over == "rankset" else groups * self.ranksets

    def stripe_slots(self, placement: np.ndarray) -> np.ndarray:
        """The slots of each request's stripe in rotation order, (n, D) (`_stripe_slot`)."""
        return self._stripe_slot(np.asarray(placement, np.int64)[:, None], np.arange(self._stripe_positions))

    def _stripe_slot(self, placement: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Slot of stripe position `pos` of requests at slot `placement` = g0 * R + o0 (channel group g0 of the
        G = C / S groups, offset o0), in rotation order: group (g0 + pos) mod G, offset o0 (`stripe_over =
        "rankset"`, D = G), or with the offset advancing each time the groups wrap (`"replica"`, D = G R)."""
        G, R = self.channels // self.shard, self.ranksets
        g0, o0 = np.divmod(placement, R)
        wrap = 0 if self._stripe_positions == G else (g0 + pos) // G
        return (g0 + pos) % G * R + (o0 + wrap) % R

    def spread(self, placement: np.ndarray, tokens: np.ndarray,
               order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
        """Where requests' tokens lie: (request index, slot, tokens) per (request, slot) holding any. Unstriped:
        all at the request's slot placement[i]. Striped: chunk k of `chunk_tokens` at position k mod D of the
        request's stripe (`stripe_slots`; with `order` (n, D) given, position j at order[i, j] where that is
        decided, >= 0, and the later positions on the stripe's other slots in rotation order), so each position
        holds floor(n_full / D) or one more full chunk and one holds the partly filled last chunk. Within a slot
        the heads stay split over its S channels, as unstriped."""
        if not self.striped:
            return super().spread(placement, tokens)
        placement, tokens = np.asarray(placement, np.int64), np.asarray(tokens, np.int64)
        K, D = self.coord.chunk_tokens, self._stripe_positions
        full, rem = np.divmod(tokens, K)
        j = np.arange(D)
        held = K * (full[:, None] // D + (j < full[:, None] % D)) + rem[:, None] * (j == full[:, None] % D)
        req, pos = np.nonzero(held)
        slot = self._stripe_slot(placement[req], pos)
        if order is not None and order.shape[1]:
            decided = order[req, pos]
            slot = np.where(decided >= 0, decided, slot)
            late = np.flatnonzero((decided < 0) & (order[req, 0] >= 0))  # past a request's decided positions
            if len(late):
                rows, back = np.unique(req[late], return_inverse=True)
                slot[late] = self._undecided(order[rows], self.stripe_slots(placement[rows]))[back, pos[late]]
        return req, slot, held[req, pos]

    @staticmethod
    def _undecided(order: np.ndarray, rotation: np.ndarray) -> np.ndarray:
        """Each request's stripe order (n, D) with the positions after its decided ones (a prefix: the scheduler
        decides them in turn) on the stripe's other slots, in rotation order."""
        taken = (rotation[:, :, None] == order[:, None, :]).any(axis=2)
        rest = np.take_along_axis(rotation, np.argsort(taken, axis=1, kind="stable"), axis=1)
        after = np.arange(order.shape[1]) - (order >= 0).sum(axis=1)[:, None]
        return np.where(order >= 0, order, np.take_along_axis(rest, np.maximum(after, 0), axis=1))

    def pim_layer_work_split(self, ids, ctx, placement, pre_ids, pre_tokens, pre_place, offsets, pre_prefix=None,
                             order=None, pre_order=None) -> tuple[np.ndarray, np.ndarray, dict]:  # fmt: skip
        """`pim_layer_work`, the part of it each rank is blocked by transfers into and out of the DIMMs (Q,
        K/V and prefill writes, output reads; without rankset overlap, every write of the rank's channel), and
        the layer's dynamic energy at each offset (every rank's work above its static power: the device model's
        commands and PU operations, the prefill writes).

        The device's rank time includes writing each request's Q and new K/V token and reading its output back
        (striped: per rank holding some of its tokens, a partial); prefill requests `pre_ids` also write
        `pre_tokens` tokens of KV per layer (after their `pre_prefix` tokens) into the ranks that hold them.
        With rankset overlap a write blocks only the rank written; without it, every rank of its channel.
        `order`, `pre_order`: the decode and prefill requests' decided stripe slots (`spread`)."""
        R, C, n, k = self.ranksets, self.channels, self.n_ranks, self.slots
        # Requests sharing a slot share their ranks in every layer, and each of the slot's S ranks holds the
        # same share of their heads; layer residue rho only moves a slot to other ranks of the same channels.
        pre_w = np.zeros(k)
        pre_e = np.zeros(len(COMPONENTS))
        if len(pre_ids):
            before = np.zeros(len(pre_ids)) if pre_prefix is None else np.asarray(pre_prefix, float)
            _, slot_a, held_a = self.spread(pre_place, before, pre_order)
            _, slot_b, held_b = self.spread(pre_place, before + pre_tokens, pre_order)
            tokens = np.bincount(slot_b, weights=held_b, minlength=k) - np.bincount(slot_a, held_a, minlength=k)
            pre_w = np.asarray(self.pim.kv_write_time(tokens, layers=1), float)
            pre_e = self.pim.kv_write_energy(tokens, layers=1, dynamic=True).sum(axis=0)
        n_off = len(offsets)
        energy = np.zeros((n_off, len(COMPONENTS)))
        comps, hosts = np.zeros((n_off, k)), np.zeros((n_off, k))
        if len(ids):  # every offset's layout in one device call, offset si on slots si * k ...
            spreads = [self.spread(placement, ctx + j, order) for j in offsets]
            slot = np.concatenate([si * k + sp[1] for si, sp in enumerate(spreads)])
            comp, cat, e = self.pim.layer_attention(np.concatenate([sp[2] for sp in spreads]), slot, dynamic=True,
                                                    n_ranks=n_off * k)  # fmt: skip
            comps, hosts = comp.reshape(-1, k), cat[:, self._host_cats].sum(axis=1).reshape(-1, k)
            energy = e.reshape(n_off, k, -1).sum(axis=1)
        energy = self.shard * (energy + pre_e)  # each of a slot's S ranks holds a 1/S share
        # per offset, residue rho and rank: a slot's figures on each of its S ranks
        comp_r, host_r, pre_r = np.zeros((n_off, R, n)), np.zeros((n_off, R, n)), np.zeros((R, n))
        comp_r[:, self._residue_rows, self._slot_ranks] = comps[:, None, :, None]
        host_r[:, self._residue_rows, self._slot_ranks] = hosts[:, None, :, None]
        pre_r[self._residue_rows, self._slot_ranks] = pre_w[:, None]
        if self.coord.rankset_overlap:
            work, stalled = comp_r + pre_r, host_r + pre_r
        else:  # every write blocks all ranks of its channel
            channel_writes = np.repeat((host_r + pre_r).reshape(n_off, R, C, R).sum(axis=3), R, axis=2)
            active = comp_r + pre_r > 0
            work = np.where(active, comp_r - host_r + channel_writes, 0.0)
            stalled = np.where(active, channel_writes, 0.0)
        return work, stalled, self.pim.energy.parts(energy)

    # --- attention outputs ----------------------------------------------------------------------------
    def outputs(self, ctx: np.ndarray, placement: np.ndarray, offsets: np.ndarray) -> dict[str, np.ndarray]:
        """Per layer, at each step offset: bytes down the host link, GPU seconds merging partials and host
        seconds merging them. Striped requests return one partial per rank holding their tokens; merged on the
        GPU, every partial crosses PCIe and a memory-bound kernel rescales and sums them; merged on the host,
        the CPUs do it (2 FLOP per partial element at the host's FP32 peak, its share for this replica) and only
        the merged FP16 outputs cross."""
        out = super().outputs(ctx, placement, offsets)
        if not self.striped or not len(ctx):
            return out
        # a request holds min(D, its chunks) positions: that many partials
        chunks = -(-(np.asarray(ctx, float)[None, :] + np.asarray(offsets)[:, None]) // self.coord.chunk_tokens)
        parts = np.minimum(chunks, self._stripe_positions).sum(axis=1)
        n, m = len(ctx), self.dep.model
        if self.coord.partial_merge == "gpu":
            out["down_bytes"] = parts * self._partial_bytes
            out["merge_gpu_s"] = self.gpu.merge_partials(parts * self._partial_bytes, n * m.q_dim * m.dtype_bytes)
        else:
            out["merge_host_s"] = 2.0 * parts * m.n_heads * m.head_dim / self._host_flops
        return out
