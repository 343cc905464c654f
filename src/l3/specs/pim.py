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
    result_buffer_bytes: int = 256  # per bank: partial sums held for the rank PU (64 x FP32)
    accumulate: Literal["fp32", "fp16"] = "fp32"  # accumulation precision of the MAC datapath


class RankPuSpec(SpecModel):
    """One PU per rank on the DIMM buffer chip (logic process): adder, softmax, re-layout."""

    link_to_chips_multiple: float = 8.0  # B_rk / B_bk (L3.md: derived from the bubble-free condition)
    clock_ghz: float = 1.0
    adder_lanes: int = 32  # FP32 adds per cycle (cross-chip / cross-bank partial sums)
    softmax_lanes: int = 16  # exp + running max/sum per cycle
    relayout_sram_bytes: int = 4096  # double-buffered burst re-layout staging


class PimFeatures(SpecModel):
    """The three hardware fixes of L3 (each switchable off for ablation) and overrides."""

    inflight_relayout: bool = True  # off: the host CPU re-lays out KV (extra read + write over the bus)
    kv_mapping: bool = True  # off: naive token-major placement, cross-chip K reduction per token
    bubble_free: bool = True  # off: bank PUs wait while the rank PU drains each chunk
    n_hc: int | None = None  # chips per head; None = largest value meeting the bubble-free condition


class PimSpec(SpecModel):
    bank_pu: BankPuSpec = BankPuSpec()
    rank_pu: RankPuSpec = RankPuSpec()
    shared_buffer_bytes: int = 4096  # per rank: broadcast operand (Q for scores, a chunk of S for context)
    features: PimFeatures = PimFeatures()

    @model_validator(mode="after")
    def _check(self) -> PimSpec:
        if self.bank_pu.gqa_reuse_max < 1:
            raise ValueError("bank_pu.gqa_reuse_max must be >= 1")
        if self.rank_pu.link_to_chips_multiple <= 0:
            raise ValueError("rank_pu.link_to_chips_multiple must be > 0")
        n = self.features.n_hc
        if n is not None and (n < 1 or n & (n - 1)):
            raise ValueError(f"features.n_hc must be a power of two >= 1 (got {n})")
        return self
