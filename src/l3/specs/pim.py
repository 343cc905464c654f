"""Processing-unit parameters of the DIMM-PIM device (bank PUs, rank PU, shared buffer) and its feature switches.

The paper gives the bank PU's access width and the bubble-free condition; buffer sizes, clocks and rank-PU
throughputs are not given: the defaults below are our stated assumptions (see docs/pim.md), all overridable.
"""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from l3.specs.base import SpecModel


class BankPuSpec(SpecModel):
    """One PU per bank, in the DRAM process; reads its own bank one column access per tCCD_L."""

    gqa_reuse_max: int = 8  # N_cmr: query heads one fetched K/V element can serve (MACs per element)
    # Per bank. Our assumption: it must hold the context-phase accumulators (query heads x E_h / N_hc at
    # `accumulate` precision: 8 x 128 x 4 B = 4 KB for GQA-8 on one chip per head, the densest default case)
    # plus double-buffered score partials; 8 KB is the next power of two.
    result_buffer_bytes: int = 8192
    accumulate: Literal["fp32", "fp16"] = "fp32"  # accumulation precision of the MAC datapath
    # Bytes of one score partial sent to the rank PU. 2 (FP16, the KV element width) is our reading of the
    # paper's bubble-free condition, which counts partials like KV elements; 4 halves the N_hc bound.
    partial_bytes: int = 2
    # How a bank's column data reaches its PU. "per_bank" (our assumption, the PIM design's premise): every bank
    # has its own path from its sense amplifiers to its PU, so all banks read a column each tCCD_L at once.
    # "bank_group": the banks of a bank group share the group's data path (as DDR4's bank-group I/O does), so an
    # all-bank column read takes banks-per-group x tCCD_L.
    data_path: Literal["per_bank", "bank_group"] = "per_bank"


class RankPuSpec(SpecModel):
    """One PU per rank on the DIMM buffer chip (logic process): adder, softmax, re-layout."""

    # B_rk / B_bk, B_rk = the rank PU's link to all chips of its rank together (L3 paper's bubble-free
    # condition: N_hc = 8 for MHA needs B_rk = 8 B_bk).
    link_to_chips_multiple: float = 8.0
    clock_ghz: float = 1.0  # our assumption: a modest clock for a logic block on the DIMM buffer chip
    adder_lanes: int = 32  # FP32 adds per rank-PU cycle (cross-chip / cross-bank sums); our assumption
    softmax_lanes: int = 16  # exp / scale operations per rank-PU cycle; our assumption
    relayout_sram_bytes: int = 4096  # double-buffered burst re-layout staging
    # Scores of one head round held between the score and context phases (our assumption: 1 MiB of SRAM;
    # MHA scores of 256K tokens fit). Longer contexts are processed in segments that each fit.
    score_buffer_bytes: int = 1 << 20


class PimFeatures(SpecModel):
    """The three hardware fixes of L3 (each switchable off for ablation) and overrides."""

    inflight_relayout: bool = True  # off: the host CPU re-lays out KV (extra read + write over the bus)
    kv_mapping: bool = True  # off: naive token-major placement, cross-chip K reduction per token
    bubble_free: bool = True  # off: bank PUs wait while the rank PU drains each chunk
    n_hc: int | None = None  # chips per head; None = largest value meeting the bubble-free condition


# Energy (pJ) and area (um^2) of logic and SRAM at 45 nm: Horowitz, "Computing's energy problem", ISSCC 2014
# (FP16 add 0.4 pJ / 1,360 um^2, FP16 multiply 1.1 pJ / 1,640 um^2, FP32 add 0.9 pJ / 4,184 um^2, FP32 multiply
# 3.7 pJ / 7,700 um^2, an 8 KB SRAM's 64-bit access 10 pJ); SRAM area from a 0.346 um^2 6T cell (Intel 45 nm) at
# 50% array efficiency (assumption). Other nodes scale energy and area by (node / 45) and (node / 45)^2
# (assumption, docs/energy.md).
LOGIC_45NM = {"fp16_add_pj": 0.4, "fp16_mul_pj": 1.1, "fp32_add_pj": 0.9, "fp32_mul_pj": 3.7,
              "sram_pj_per_byte": 10 / 8, "fp16_add_um2": 1360.0, "fp16_mul_um2": 1640.0, "fp32_add_um2": 4184.0,
              "fp32_mul_um2": 7700.0, "sram_um2_per_byte": 8 * 0.346 / 0.5}  # fmt: skip


def mac_j(node_nm: float, accumulate: str = "fp32") -> float:
    """Energy of one FP16 multiply-accumulate (FP16 multiply, `accumulate`-precision add) at `node_nm`, J."""
    return (LOGIC_45NM["fp16_mul_pj"] + LOGIC_45NM[f"{accumulate}_add_pj"]) * node_nm / 45.0 * 1e-12


class PimEnergySpec(SpecModel):
    """Energy of the DIMM-PIM's logic beyond the DRAM commands (docs/energy.md): technology nodes the 45 nm
    figures (LOGIC_45NM) scale to, and what has no 45 nm figure. Area uses the same nodes."""

    # The bank PUs are built in the DRAM process, whose logic (few metal layers, slow high-Vt transistors) we take
    # as equivalent to 45 nm logic in energy per operation (assumption) ...
    bank_pu_node_nm: float = 45.0
    # ... and `dram_logic_area_factor` times its area (assumption: DRAM-process logic is that much less dense).
    dram_logic_area_factor: float = 3.0
    # A bank PU's column access costs this fraction of a burst read's energy (IDD4R beyond IDD3N, which also
    # drives the chip's global data path and serializer toward its pins). 1.0: the upper bound; we have no sourced
    # split. The HBM-PIM baselines' bank reads use the same fraction of an HBM access.
    bank_read_fraction: float = 1.0
    # The rank PU sits on the DIMM's buffer chip, a logic die (our assumption: a 28 nm node).
    rank_pu_node_nm: float = 28.0
    softmax_ops_per_value: float = 4.0  # FP32 multiply-adds per exponential or rescale (assumption: a short
    # polynomial after range reduction)
    rank_link_pj_per_bit: float = 2.0  # rank PU <-> chips over the DIMM's short traces (assumption)
    host_cpu_w: float = 450.0  # host CPUs re-laying out KV without in-flight re-layout: 2 x 225 W TDP (EPYC 7742)
    dram_die_mm2: float = 110.0  # one DRAM die, for area fractions (assumption: a 32 Gb die, 2x a ~55 mm^2 8 Gb die
    # scaled by density)

    @model_validator(mode="after")
    def _check(self) -> PimEnergySpec:
        for f in ("bank_pu_node_nm", "dram_logic_area_factor", "rank_pu_node_nm", "softmax_ops_per_value",
                  "rank_link_pj_per_bit", "host_cpu_w", "dram_die_mm2", "bank_read_fraction"):  # fmt: skip
            if getattr(self, f) <= 0:
                raise ValueError(f"{f} must be > 0")
        if self.bank_read_fraction > 1:
            raise ValueError("bank_read_fraction must be <= 1")
        return self


class PimSpec(SpecModel):
    bank_pu: BankPuSpec = BankPuSpec()
    rank_pu: RankPuSpec = RankPuSpec()
    # Per chip (shared by its bank PUs): the broadcast operand, Q for scores and a double-buffered chunk of S
    # for context. Our assumption (4 KB, four rows' worth of one head slice).
    shared_buffer_bytes: int = 4096
    # How an all-bank ACT meets the activation-power limits. "staggered" (default, physically conservative:
    # DDR4's power delivery allows four ACTs per tFAW): it is issued as N_bk single-bank ACTs under tRRD_S/L
    # and tFAW; "ganged": one command opens the row in every bank and counts as one activation for tRRD/tFAW
    # (an assumption: a PIM DIMM with a power network built for it, as some bank-level PIM designs claim).
    all_bank_act: Literal["ganged", "staggered"] = "staggered"
    # Host CPU re-layout throughput, all cores together, bytes/s, used only without in-flight re-layout (the CPU
    # reads freshly written KV back, permutes it and rewrites it); every rank gets an equal share. Our estimate
    # for the DGX-A100 host (2 x EPYC 7742: 128 cores at 2.25 GHz): a 64-byte line's byte transpose takes about
    # 8 AVX2 shuffle/blend micro-ops, one per cycle, so 8 B per core-cycle: 128 x 2.25e9 x 8 = 2.3 TB/s.
    host_relayout_bw: float = 128 * 2.25e9 * 8
    features: PimFeatures = PimFeatures()
    energy: PimEnergySpec = PimEnergySpec()

    @model_validator(mode="after")
    def _check(self) -> PimSpec:
        if self.bank_pu.gqa_reuse_max < 1:
            raise ValueError("bank_pu.gqa_reuse_max must be >= 1")
        if self.bank_pu.partial_bytes not in (2, 4):
            raise ValueError("bank_pu.partial_bytes must be 2 or 4")
        if self.host_relayout_bw <= 0:
            raise ValueError("host_relayout_bw must be > 0 bytes/s")
        if self.rank_pu.link_to_chips_multiple <= 0:
            raise ValueError("rank_pu.link_to_chips_multiple must be > 0")
        n = self.features.n_hc
        if n is not None and (n < 1 or n & (n - 1)):
            raise ValueError(f"features.n_hc must be a power of two >= 1 (got {n})")
        return self
