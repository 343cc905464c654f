"""Baselines whose memory-side attention device is one pool of bandwidth per replica: HBM-PIM, HBM-PIM-EXT,
rank-level DIMM-PIM (R-PIM) and CPU offloading.

They share L3's iteration graph (two sub-batches, GPU dense work overlapping memory-side attention, host-link
transfers where the KV lives outside the GPUs) and differ in capacity, links and the attention device
(l3.devices.attention_pool, .cpu, .hbm_pim): a layer's attention of a sub-batch takes the device's read time
for its decodes plus the time to write the prefill chunks' new KV; every request spreads over the whole pool.
"""

from __future__ import annotations

import numpy as np

from l3.devices.attention_pool import IdealPool
from l3.devices.cpu import CpuAttention
from l3.devices.hbm_pim import HbmPimAttention
from l3.specs.system import Deployment
from l3.systems.offload import AttentionOffloadSystem


def build_device(dep: Deployment):
    """The attention device of one replica of a pooled-attention system."""
    spec, m, share = dep.system.attention, dep.model, 1.0 / dep.dp
    write_bw = spec.resolved("write_bandwidth")
    if spec.variant == "mechanism" and spec.cpu is not None:
        return CpuAttention(spec.cpu_spec(), m, write_bw, share)
    if spec.variant == "mechanism":
        return HbmPimAttention(spec.hbm, m, write_bw, share)
    return IdealPool(m, spec.resolved("bandwidth"), write_bw, spec.resolved("flops"), share)


class PooledAttentionSystem(AttentionOffloadSystem):
    memory_device = "attn"

    def __init__(self, dep: Deployment):
        super().__init__(dep, ranksets=1, channels=1)
        spec = dep.system.attention
        self.spec = spec
        self.device = build_device(dep)
        capacity = spec.resolved("capacity_bytes")
        # "hbm": KV beside the weights, as on GPU-only
        device = dep.hbm_kv_tokens if capacity == "hbm" else int(capacity // dep.dp // dep.model.kv_bytes_per_token)
        if self.coord.asymmetric:  # HBM_TIER, DEVICE_TIER: the GPUs' spare HBM (attention on the GPU), the device
            self._tiers = (dep.hbm_kv_tokens, device)
        else:
            self._tiers = (device,)

    @property
    def kv_capacity_tokens(self) -> int:
        return sum(self._tiers)

    @property
    def kv_tiers(self) -> tuple[int, ...]:
        return self._tiers

    @property
    def attention_model(self) -> str:
        return self.device.variant

    @property
    def attention_bw(self) -> float:
        return self.spec.resolved("bandwidth") / self.dep.dp

    @property
    def slots(self) -> int:
        return 1

    def pcie(self, nbytes: float) -> float:
        return super().pcie(nbytes) if self.spec.link == "host" else 0.0

    def pim_layer_work(self, ids, ctx, placement, pre_ids, pre_tokens, pre_place, offsets,
                       pre_prefix=None) -> np.ndarray:  # fmt: skip
        steps_ctx = ctx[None, :] + np.asarray(offsets, float)[:, None]  # (offsets, requests) tokens attended
        work = self.device.read_seconds(steps_ctx) + self.device.write_seconds(float(np.sum(pre_tokens)))
        return work.reshape(len(offsets), 1, 1)
