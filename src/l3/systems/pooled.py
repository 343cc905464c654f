"""Baselines whose memory-side attention device is one pool of bandwidth per replica: HBM-PIM, HBM-PIM-EXT,
rank-level DIMM-PIM (R-PIM) and CPU offloading.

They share L3's iteration graph (two sub-batches, GPU dense work overlapping memory-side attention, host-link
transfers where the KV lives outside the GPUs) and differ in capacity, bandwidth, arithmetic and links. A
layer's attention of a sub-batch takes max(KV bytes read / bandwidth, FLOPs / arithmetic rate), plus the
time to write the prefill chunks' new KV; every request spreads over the whole pool (ideal balance).
"""

from __future__ import annotations

import numpy as np

from l3.specs.system import Deployment
from l3.systems.offload import AttentionOffloadSystem


class PooledAttentionSystem(AttentionOffloadSystem):
    memory_device = "attn"

    def __init__(self, dep: Deployment):
        super().__init__(dep, ranksets=1, channels=1)
        spec = dep.system.attention
        self.spec = spec
        eff, dp = spec.efficiency, dep.dp
        self.bw = spec.bandwidth * eff / dp  # this replica's share, bytes/s
        self.write_bw = spec.write_bandwidth / dp
        self.flops = spec.flops * eff / dp
        m = dep.model
        if spec.capacity_bytes == "hbm":  # KV beside the weights, replicated heads counted as on GPU-only
            self._kv_tokens = int(dep.hbm_free_bytes // (m.kv_bytes_per_token * max(1, dep.tp // m.n_kv_heads)))
        else:
            self._kv_tokens = int(spec.capacity_bytes // dp // m.kv_bytes_per_token)
        self._flops_per_token = 4.0 * m.head_dim * m.n_heads  # QK^T and SV per KV token, per layer

    @property
    def kv_capacity_tokens(self) -> int:
        return self._kv_tokens

    @property
    def attention_bw(self) -> float:
        return self.spec.bandwidth / self.dep.dp

    @property
    def slots(self) -> int:
        return 1

    def pcie(self, nbytes: float) -> float:
        return super().pcie(nbytes) if self.spec.link == "host" else 0.0

    def pim_layer_work(self, ids, ctx, placement, pre_ids, pre_tokens, pre_place, offsets) -> np.ndarray:
        tokens = float(np.sum(ctx)) + len(ids) * np.asarray(offsets, float)  # KV tokens read per step
        read = tokens * self._kv_layer / self.bw
        compute = tokens * self._flops_per_token / self.flops if self.flops > 0 else 0.0
        write = float(np.sum(pre_tokens)) * self._kv_layer / self.write_bw
        work = np.where(tokens > 0, np.maximum(read, compute), 0.0) + write
        return work.reshape(len(offsets), 1, 1)
