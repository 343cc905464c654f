"""Baselines whose memory-side attention device is one pool of bandwidth per replica: HBM-PIM, HBM-PIM-EXT,
rank-level DIMM-PIM (R-PIM) and CPU offloading.

They share L3's iteration graph (two sub-batches, GPU dense work overlapping memory-side attention, host-link
transfers where the KV lives outside the GPUs) and differ in capacity, links and the attention device
(l3.devices.attention_pool, .cpu, .hbm_pim): a layer's attention of a sub-batch takes the device's read time
for its decodes plus the time to write the prefill chunks' new KV; every request spreads over the whole pool.
"""

from __future__ import annotations

import numpy as np

from l3.devices.attention_pool import IdealPool, PoolEnergy
from l3.devices.cpu import CpuAttention
from l3.devices.hbm_pim import HbmPimAttention
from l3.specs.dram import get_org, get_timing
from l3.specs.pim import PimEnergySpec, mac_j
from l3.specs.system import Deployment
from l3.systems.offload import AttentionOffloadSystem

# The DIMMs of a pooled device that keeps its KV in DIMMs: the L3 platform's (their dies; their timing where no
# CPU preset names one, as for R-PIM).
DIMM_ORG, DIMM_TIMING = "ddr4-l3-2tb", "ddr4-3200"


def build_device(dep: Deployment):
    """The attention device of one replica of a pooled-attention system, with its energy figures."""
    spec, m, share = dep.system.attention, dep.model, 1.0 / dep.dp
    write_bw = spec.resolved("write_bandwidth")
    if spec.variant == "mechanism" and spec.cpu is not None:
        device = CpuAttention(spec.cpu_spec(), m, write_bw, share)
    elif spec.variant == "mechanism":
        device = HbmPimAttention(spec.hbm, m, write_bw, share)
    else:
        device = IdealPool(m, spec.resolved("bandwidth"), write_bw, spec.resolved("flops"), share)
    device.energy_spec = pool_energy(dep)
    return device


def pool_energy(dep: Deployment) -> PoolEnergy:
    """Energy figures of one replica's share of a pooled device (docs/energy.md). HBM: every byte at the GPU's
    HBM energy per bit (reads by the bank PUs at L3's `bank_read_fraction` of it), multiply-accumulates in bank
    PUs as L3's (PimEnergySpec defaults). DIMMs: bytes at the
    DRAM's row-streaming energy, standby and refresh of every chip; the arithmetic on the CPU's cores (their
    share of its TDP while attending) or in rank PUs (L3's rank-PU node)."""
    spec, share, pu = dep.system.attention, 1.0 / dep.dp, PimEnergySpec()
    if spec.resolved("memory") == "hbm":
        per_byte = dep.gpu.hbm_pj_per_bit * 8e-12
        return PoolEnergy(per_byte * pu.bank_read_fraction, per_byte, mac_j(pu.bank_pu_node_nm), "pim_compute",
                          0.0, 0.0)  # fmt: skip
    cpu = spec.cpu_spec()
    timing = cpu.timing if cpu is not None else get_timing(DIMM_TIMING)
    chips = spec.resolved("capacity_bytes") / get_org(DIMM_ORG).chip_bytes * share
    static = chips * timing.chip_static_w()
    read, write = timing.stream_j_per_byte(), timing.stream_j_per_byte(write=True)
    if cpu is not None:
        return PoolEnergy(read, write, 0.0, "cpu", cpu.tdp_w * share, static)
    return PoolEnergy(read, write, mac_j(pu.rank_pu_node_nm), "pim_compute", 0.0, static)


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

    @property
    def link_j_per_byte(self) -> float:
        return super().link_j_per_byte if self.spec.link == "host" else 0.0

    def static_power(self) -> dict[str, float]:
        return super().static_power() | {"dram_background": self.device.energy_spec.static_w}

    def pim_layer_work_split(self, ids, ctx, placement, pre_ids, pre_tokens, pre_place, offsets, pre_prefix=None,
                             order=None, pre_order=None) -> tuple[np.ndarray, np.ndarray, dict]:  # fmt: skip
        steps_ctx = ctx[None, :] + np.asarray(offsets, float)[:, None]  # (offsets, requests) tokens attended
        written = float(np.sum(pre_tokens))
        work = self.device.read_seconds(steps_ctx) + self.device.write_seconds(written)
        energy = self.device.energy(steps_ctx, written, work)
        return work.reshape(len(offsets), 1, 1), np.zeros((len(offsets), 1, 1)), energy
