"""L3: GPUs run weights and dense layers; the KV cache and decode attention live in DIMM-PIM.

The iteration graph (sub-batches, PCIe, pipelining) is `AttentionOffloadSystem`'s; here the memory side is the
DIMM-PIM device, its units are ranks, and a layer's attention time per rank comes from the device model.

Placement (docs/l3-system.md): at admission a request gets a slot: a group of S channels and an offset o. Its
layer l lives in rankset (l + o) mod R, its KV heads split evenly over the S ranks of that rankset in the
group's channels (S = 1 with `placement = "rank"`). Layers rotate over all ranksets; requests sharing a slot
share ranks in every layer. A write into a rank blocks that rank's compute
(`rankset_overlap`); without rankset overlap it blocks every rank of its channel. DP replicas each own an
equal share of the channels.
"""

from __future__ import annotations

import numpy as np

from l3.devices.pim.device import PimDevice
from l3.devices.pim.timing import CATEGORIES
from l3.specs.dram import DramSpec
from l3.specs.system import Deployment
from l3.systems.offload import AttentionOffloadSystem


class L3System(AttentionOffloadSystem):
    def __init__(self, dep: Deployment):
        m, sysspec = dep.model, dep.system
        full = sysspec.pim.dram()
        channels = full.org.channels // dep.dp  # this replica's share of the host's channels
        self.dram = DramSpec(timing=full.timing, org=full.org.model_copy(update={"channels": channels}))
        super().__init__(dep, self.dram.org.ranks_per_channel, channels)
        self.shard = self._shard(PimDevice(self.dram, sysspec.pim.pu, m).n_hc)
        # The device model of one rank's share of a request-layer: n_kv_heads / shard KV heads.
        share = m.model_copy(update={"n_heads": m.n_heads // self.shard, "n_kv_heads": m.n_kv_heads // self.shard})
        self.pim = PimDevice(self.dram, sysspec.pim.pu, share)
        self._slot_ranks = [self.ranks_of(np.arange(self.slots), rho) for rho in range(self.ranksets)]
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

        The device's rank time includes writing each request's Q and new K/V token and reading its output back; prefill
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
