"""GPU, interconnect and host-CPU presets. Units: FLOP/s, bytes/s, bytes, seconds."""

from __future__ import annotations

import numpy as np
from pydantic import model_validator

from l3.specs.base import SpecModel, lookup, require_positive
from l3.specs.dram import DramTiming, get_timing


class GpuSpec(SpecModel):
    name: str
    peak_flops: float  # dense FP16/BF16 tensor-core FLOP/s
    hbm_bw: float  # bytes/s
    hbm_bytes: int
    sm_count: int
    l2_bytes: int  # last-level (L2) cache
    tdp_w: float  # board power limit, W
    idle_w: float  # static power, W: drawn whether the GPU computes or waits
    hbm_pj_per_bit: float  # HBM access energy (array, I/O and PHY), pJ per bit moved
    source: str = ""

    @model_validator(mode="after")
    def _check(self) -> GpuSpec:
        require_positive(self, ("peak_flops", "hbm_bw", "hbm_bytes", "sm_count", "l2_bytes", "tdp_w", "idle_w",
                                "hbm_pj_per_bit"))  # fmt: skip
        if self.idle_w >= self.tdp_w:
            raise ValueError("idle_w must be below tdp_w")
        return self

    @property
    def flop_j(self) -> float:
        """Energy of one tensor-core FLOP, J: the power above idle at TDP spread over the peak FLOP rate (an
        upper-end figure: at TDP some of that power moves data, which is charged again per HBM byte)."""
        return (self.tdp_w - self.idle_w) / self.peak_flops


class LinkSpec(SpecModel):
    """A point-to-point link. `bw` is usable bandwidth per direction; `latency_s` is paid per transfer."""

    name: str
    bw: float  # bytes/s per direction
    latency_s: float
    pj_per_bit: float  # energy of one bit crossing, both ends
    source: str = ""

    @model_validator(mode="after")
    def _check(self) -> LinkSpec:
        if self.bw <= 0 or self.latency_s < 0 or self.pj_per_bit < 0:
            raise ValueError("bw must be > 0, latency_s and pj_per_bit >= 0")
        return self

    def transfer_time(self, nbytes):
        """Seconds to move `nbytes` (scalar or array) in one transfer; zero bytes cost nothing."""
        nbytes = np.asarray(nbytes, dtype=float)
        return np.where(nbytes > 0, self.latency_s + nbytes / self.bw, 0.0)


class CpuSpec(SpecModel):
    """A host's CPUs (all sockets) and their DRAM, as the memory-side device of CPU offloading."""

    name: str
    sockets: int
    cores_per_socket: int
    clock_ghz: float  # sustained all-core clock
    fp32_flops_per_cycle: int  # per core: SIMD lanes x FMA pipes x 2
    fp16_to_fp32_per_cycle: int  # FP16 KV values one core widens to FP32 per cycle (x86 F16C)
    memory: str  # DRAM timing preset of the channels
    channels: int  # DRAM channels over all sockets
    channel_bytes: int = 8  # data bus width of one channel (64-bit DDR4)
    memory_bytes: int  # installed DRAM
    tdp_w: float  # all sockets at full load, W
    source: str = ""

    @model_validator(mode="after")
    def _check(self) -> CpuSpec:
        require_positive(self, ("sockets", "cores_per_socket", "clock_ghz", "fp32_flops_per_cycle",
                                "fp16_to_fp32_per_cycle", "channels", "channel_bytes", "memory_bytes",
                                "tdp_w"))  # fmt: skip
        get_timing(self.memory)
        return self

    @property
    def cores(self) -> int:
        return self.sockets * self.cores_per_socket

    @property
    def timing(self) -> DramTiming:
        return get_timing(self.memory)

    @property
    def peak_flops(self) -> float:
        """FP32 FLOP/s of all cores."""
        return self.cores * self.clock_ghz * 1e9 * self.fp32_flops_per_cycle

    @property
    def peak_bw(self) -> float:
        """DRAM bandwidth of all channels at the pin rate, bytes/s."""
        return self.channels * self.channel_bytes * self.timing.data_rate_mts * 1e6


GB = 1e9
GPU_PRESETS: dict[str, GpuSpec] = {
    g.name: g
    for g in [
        GpuSpec(name="a100-80gb", peak_flops=312e12, hbm_bw=2.039e12, hbm_bytes=80 * 2**30, sm_count=108,
                l2_bytes=40 * 2**20, tdp_w=400, idle_w=60, hbm_pj_per_bit=3.9,
                source="NVIDIA A100 datasheet (SXM4 80GB): 312 TFLOP/s FP16 dense, 2,039 GB/s HBM2e, 400 W; "
                       "A100 architecture whitepaper: 40 MB L2; idle 60 W (assumption); HBM2 3.9 pJ/bit "
                       "(O'Connor et al., Fine-Grained DRAM, MICRO 2017)"),
        GpuSpec(name="h100-sxm", peak_flops=989.4e12, hbm_bw=3.35e12, hbm_bytes=80 * 2**30, sm_count=132,
                l2_bytes=50 * 2**20, tdp_w=700, idle_w=90, hbm_pj_per_bit=3.9,
                source="NVIDIA H100 datasheet (SXM5): 989.4 TFLOP/s FP16 dense, 3.35 TB/s HBM3, 700 W; "
                       "H100 architecture whitepaper: 50 MB L2; idle 90 W (assumption); HBM3 at HBM2's 3.9 pJ/bit "
                       "(assumption)"),
        GpuSpec(name="h200", peak_flops=989.4e12, hbm_bw=4.8e12, hbm_bytes=141 * 10**9, sm_count=132,
                l2_bytes=50 * 2**20, tdp_w=700, idle_w=90, hbm_pj_per_bit=3.9,
                source="NVIDIA H200 datasheet (SXM): 989.4 TFLOP/s FP16 dense, 4.8 TB/s, 141 GB HBM3e, 700 W; the "
                       "H100's GH100 die, 50 MB L2; idle 90 W and 3.9 pJ/bit (assumptions, as H100)"),
        GpuSpec(name="b200", peak_flops=2.25e15, hbm_bw=8.0e12, hbm_bytes=180 * 10**9, sm_count=148,
                l2_bytes=126 * 2**20, tdp_w=1000, idle_w=130, hbm_pj_per_bit=3.9,
                source="NVIDIA HGX B200 (1,000 W): 2.25 PFLOP/s FP16 dense, 8 TB/s HBM3e, 180 GB per GPU (1.44 TB "
                       "per 8 GPUs); 148 SMs and 126 MB L2 (Chips and Cheese, B200 microbenchmarks, 2025); idle "
                       "130 W (assumption: H100's 13% of TDP) and 3.9 pJ/bit (assumption)"),
    ]
}  # fmt: skip

LINK_PRESETS: dict[str, LinkSpec] = {
    lk.name: lk
    for lk in [
        # PCIe: 16 lanes x GT/s x 128b/130b encoding / 8 bits; latency is our assumption for a DMA round trip.
        # Energy per bit: our assumptions (docs/energy.md): a PCIe link with its controllers 5 pJ/bit, an NVLink
        # SerDes lane with the switch hop 1.5 pJ/bit.
        LinkSpec(name="pcie4-x16", bw=16 * 16e9 * 128 / 130 / 8, latency_s=5e-6, pj_per_bit=5.0,
                 source="PCIe 4.0: 16 GT/s/lane, 128b/130b -> 31.5 GB/s per direction; 5 us DMA setup (assumed)"),
        LinkSpec(name="pcie5-x16", bw=16 * 32e9 * 128 / 130 / 8, latency_s=5e-6, pj_per_bit=5.0,
                 source="PCIe 5.0: 32 GT/s/lane, 128b/130b -> 63 GB/s per direction; 5 us DMA setup (assumed)"),
        LinkSpec(name="nvlink3", bw=300 * GB, latency_s=2e-6, pj_per_bit=1.5,
                 source="NVLink 3 (A100): 600 GB/s total = 300 GB/s per direction per GPU; 2 us (assumed)"),
        LinkSpec(name="nvlink4", bw=450 * GB, latency_s=2e-6, pj_per_bit=1.5,
                 source="NVLink 4 (H100): 900 GB/s total = 450 GB/s per direction per GPU; 2 us (assumed)"),
        LinkSpec(name="nvlink5", bw=900 * GB, latency_s=2e-6, pj_per_bit=1.5,
                 source="NVLink 5 (B200): 1.8 TB/s total = 900 GB/s per direction per GPU; 2 us (assumed)"),
        # CXL 2.0 over a PCIe 5.0 x16 PHY: 68-B flits carrying 64 B of CXL.mem data; a memory expander's
        # load-to-use latency beyond local DRAM is our assumption.
        LinkSpec(name="cxl2-x16", bw=16 * 32e9 * 128 / 130 / 8 * 64 / 68, latency_s=250e-9, pj_per_bit=5.0,
                 source="CXL 2.0 on PCIe 5.0 x16: 63 GB/s per direction x 64/68 flit payload -> 59.3 GB/s; "
                        "250 ns per transfer (assumed)"),
        # PCIe 6.0: 64 GT/s/lane (PAM4), 256-B FLITs carrying 236 B of TLP payload
        LinkSpec(name="pcie6-x16", bw=16 * 64e9 / 8 * 236 / 256, latency_s=5e-6, pj_per_bit=5.0,
                 source="PCIe 6.0: 64 GT/s/lane, FLIT mode (236 of 256 B payload) -> 118 GB/s per direction; 5 us "
                        "DMA setup (assumed)"),
    ]
}  # fmt: skip


CPU_PRESETS: dict[str, CpuSpec] = {
    c.name: c
    for c in [
        # The DGX-A100 host. Zen 2 cores: two 256-bit FMA pipes (8 FP32 lanes x 2 x 2 = 32 FLOP/cycle); one
        # 8-wide VCVTPH2PS per cycle is our assumption. 8 DDR4-3200 channels per socket, 2 x 64 GB DIMMs each.
        CpuSpec(name="epyc-7742-x2", sockets=2, cores_per_socket=64, clock_ghz=2.25, fp32_flops_per_cycle=32,
                fp16_to_fp32_per_cycle=8, memory="ddr4-3200", channels=16, memory_bytes=2 * 2**40, tdp_w=450,
                source="AMD EPYC 7742 datasheet (64 cores, 2.25 GHz base, 8 DDR4-3200 channels, 225 W TDP); NVIDIA "
                       "DGX-A100 user guide (2 sockets); 2 TiB of DIMMs as on the L3 platform"),
    ]
}  # fmt: skip


def get_cpu(name: str) -> CpuSpec:
    return lookup(CPU_PRESETS, name, "CPU")


def get_gpu(name: str) -> GpuSpec:
    return lookup(GPU_PRESETS, name, "GPU")


def get_link(name: str) -> LinkSpec:
    return lookup(LINK_PRESETS, name, "link")
