"""GPU, interconnect and host-CPU presets. Units: FLOP/s, bytes/s, bytes, seconds."""

from __future__ import annotations

import numpy as np
from pydantic import model_validator

from l3.specs.base import SpecModel, lookup


class GpuSpec(SpecModel):
    name: str
    peak_flops: float  # dense FP16/BF16 tensor-core FLOP/s
    hbm_bw: float  # bytes/s
    hbm_bytes: int
    sm_count: int
    source: str = ""

    @model_validator(mode="after")
    def _check(self) -> GpuSpec:
        for f in ("peak_flops", "hbm_bw", "hbm_bytes", "sm_count"):
            if getattr(self, f) <= 0:
                raise ValueError(f"{f} must be > 0")
        return self


class LinkSpec(SpecModel):
    """A point-to-point link. `bw` is usable bandwidth per direction; `latency_s` is paid per transfer."""

    name: str
    bw: float  # bytes/s per direction
    latency_s: float
    source: str = ""

    @model_validator(mode="after")
    def _check(self) -> LinkSpec:
        if self.bw <= 0 or self.latency_s < 0:
            raise ValueError("bw must be > 0 and latency_s >= 0")
        return self

    def transfer_time(self, nbytes):
        """Seconds to move `nbytes` (scalar or array) in one transfer; zero bytes cost nothing."""
        nbytes = np.asarray(nbytes, dtype=float)
        return np.where(nbytes > 0, self.latency_s + nbytes / self.bw, 0.0)


GB = 1e9
GPU_PRESETS: dict[str, GpuSpec] = {
    g.name: g
    for g in [
        GpuSpec(name="a100-80gb", peak_flops=312e12, hbm_bw=2.039e12, hbm_bytes=80 * 2**30, sm_count=108,
                source="NVIDIA A100 datasheet (SXM4 80GB): 312 TFLOP/s FP16 dense, 2,039 GB/s HBM2e"),
        GpuSpec(name="h100-sxm", peak_flops=989.4e12, hbm_bw=3.35e12, hbm_bytes=80 * 2**30, sm_count=132,
                source="NVIDIA H100 datasheet (SXM5): 989.4 TFLOP/s FP16 dense, 3.35 TB/s HBM3"),
        GpuSpec(name="h200", peak_flops=989.4e12, hbm_bw=4.8e12, hbm_bytes=141 * 10**9, sm_count=132,
                source="NVIDIA H200 datasheet (SXM): 989.4 TFLOP/s FP16 dense, 4.8 TB/s, 141 GB HBM3e"),
    ]
}  # fmt: skip

LINK_PRESETS: dict[str, LinkSpec] = {
    lk.name: lk
    for lk in [
        # PCIe: 16 lanes x GT/s x 128b/130b encoding / 8 bits; latency is our assumption for a DMA round trip.
        LinkSpec(name="pcie4-x16", bw=16 * 16e9 * 128 / 130 / 8, latency_s=5e-6,
                 source="PCIe 4.0: 16 GT/s/lane, 128b/130b -> 31.5 GB/s per direction; 5 us DMA setup (assumed)"),
        LinkSpec(name="pcie5-x16", bw=16 * 32e9 * 128 / 130 / 8, latency_s=5e-6,
                 source="PCIe 5.0: 32 GT/s/lane, 128b/130b -> 63 GB/s per direction; 5 us DMA setup (assumed)"),
        LinkSpec(name="nvlink3", bw=300 * GB, latency_s=2e-6,
                 source="NVLink 3 (A100): 600 GB/s total = 300 GB/s per direction per GPU; 2 us (assumed)"),
        LinkSpec(name="nvlink4", bw=450 * GB, latency_s=2e-6,
                 source="NVLink 4 (H100): 900 GB/s total = 450 GB/s per direction per GPU; 2 us (assumed)"),
    ]
}  # fmt: skip


def get_gpu(name: str) -> GpuSpec:
    return lookup(GPU_PRESETS, name, "GPU")


def get_link(name: str) -> LinkSpec:
    return lookup(LINK_PRESETS, name, "link")
