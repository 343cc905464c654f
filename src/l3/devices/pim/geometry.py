"""Derived geometry and bandwidths of a DIMM-PIM device, and the bubble-free choice of N_hc.

Units: bytes, seconds, bytes/s. B_bk is one bank PU's read bandwidth (one column access of
`burst_bytes_per_chip` bytes every tCCD_L); B_rk is the rank PU's link to the chips of its rank, all chips
together (each chip has an equal lane of B_rk / chips_per_rank).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from l3.specs.dram import DramSpec
from l3.specs.pim import PimSpec


@dataclass(frozen=True)
class PimGeometry:
    dram: DramSpec
    pim: PimSpec

    @property
    def bytes_per_access(self) -> int:
        """Bytes a bank PU reads per column access (x8 chip, BL8: 8 B = 4 FP16)."""
        return self.dram.burst_bytes_per_chip

    @property
    def access_interval_s(self) -> float:
        """Time between a bank's consecutive column accesses (tCCD_L), seconds."""
        return self.dram.timing.ns(self.dram.timing.ccd_l) * 1e-9

    @property
    def all_bank_interval_s(self) -> float:
        """Time between all-bank column reads: tCCD_L, or banks-per-group x tCCD_L where the banks of a group
        share one data path to their PUs (`bank_pu.data_path`), seconds."""
        shared = self.dram.org.banks_per_group if self.pim.bank_pu.data_path == "bank_group" else 1
        return shared * self.access_interval_s

    @property
    def bank_bw(self) -> float:
        """B_bk: one bank PU's peak read bandwidth, bytes/s (the paper's unit for B_rk)."""
        return self.bytes_per_access / self.access_interval_s

    @property
    def bank_pu_bw(self) -> float:
        """Read bandwidth of one bank PU while every bank of its chip reads (B_bk unless paths are shared)."""
        return self.bytes_per_access / self.all_bank_interval_s

    @property
    def rank_link_bw(self) -> float:
        """B_rk: rank PU <-> all chips of the rank, bytes/s (one chip's lane is B_rk / chips_per_rank)."""
        return self.pim.rank_pu.link_to_chips_multiple * self.bank_bw

    @property
    def peak_attention_bw(self) -> float:
        """Aggregate bank-level read bandwidth over all banks, bytes/s (no refresh, no row switches)."""
        return self.bank_pu_bw * self.dram.org.banks

    @property
    def ranksets(self) -> int:
        """A rankset = one rank from every channel; there are ranks-per-channel of them."""
        return self.dram.org.ranks_per_channel

    def n_hc_bound(self, head_dim: int, gqa_group: int) -> float:
        """Largest chips-per-head for which rank-side score transfer hides behind bank-side compute.

        From T_comm <= T_comp with T_comm = L * N_gqa * N_chips * p / B_rk (p = bytes per partial) and
        T_comp = 2 L * E_h * ceil(N_gqa / N_cmr) / (B_bk * N_bk * N_hc) (FP16 K, 2 bytes per element).
        """
        org = self.dram.org
        reuse = math.ceil(gqa_group / self.pim.bank_pu.gqa_reuse_max)
        return (2 * head_dim * self.rank_link_bw * reuse) / (
            self.pim.bank_pu.partial_bytes * self.bank_pu_bw * org.banks_per_chip * gqa_group * org.chips_per_rank
        )

    def n_hc(self, head_dim: int, gqa_group: int) -> int:
        """Chips per head: the override if set, else the largest power of two <= the bubble-free bound."""
        chips = self.dram.org.chips_per_rank
        if self.pim.features.n_hc is not None:
            return min(self.pim.features.n_hc, chips)
        bound = self.n_hc_bound(head_dim, gqa_group)
        n = 1
        while n * 2 <= min(bound, chips):
            n *= 2
        return n
