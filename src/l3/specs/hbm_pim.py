"""HBM stacks with a processing unit in every bank (AttAcc / NeuPIMs-like HBM-PIM): organisation and timing.

Organisation per stack follows JEDEC HBM2 in pseudo-channel mode (8 channels x 2 pseudo-channels x 4 bank
groups x 4 banks, 64-bit pseudo-channel, 1 KB row), as in Ramulator2's `HBM2_8Gb` preset. The clock is the
A100-80GB's HBM2e pin rate (2,039 GB/s over 5 stacks of 1,024 pins = 3.2 Gb/s). Column-to-column and row
timings are typical HBM2-class values and are our assumption (docs/evaluation.md); all are overridable.
"""

from __future__ import annotations

from pydantic import model_validator

from l3.specs.base import SpecModel, require_positive


class HbmPimSpec(SpecModel):
    stacks: int  # HBM-PIM stacks of the whole machine
    channels_per_stack: int = 8
    pseudo_channels: int = 2  # per channel
    banks_per_pseudo_channel: int = 16  # 4 bank groups x 4 banks
    access_bytes: int = 32  # one column access of a pseudo-channel: 64 bits x burst of 4
    page_bytes: int = 1024  # row of one bank
    tck_ns: float = 0.625  # 1.6 GHz clock, 3.2 Gb/s per pin (A100-80GB HBM2e)
    ccd_s: int = 2  # nCK between column accesses to different bank groups (the burst on the bus)
    ccd_l: int = 4  # nCK between column accesses within a bank group: a bank PU's access cadence
    rcd_ns: float = 14.0  # row activate to column access
    rp_ns: float = 14.0  # precharge
    rfc_ns: float = 350.0  # all-bank refresh (8 Gb die, as Ramulator2's HBM2 table)
    refi_ns: float = 3900.0  # refresh interval
    gqa_reuse_max: int = 8  # query heads one fetched K/V element can serve (as our L3 bank PU, docs/pim.md)

    @model_validator(mode="after")
    def _check(self) -> HbmPimSpec:
        require_positive(self, ("stacks", "channels_per_stack", "pseudo_channels", "banks_per_pseudo_channel",
                                "access_bytes", "page_bytes", "tck_ns", "ccd_s", "ccd_l", "refi_ns", "gqa_reuse_max"))
        if self.ccd_l < self.ccd_s:
            raise ValueError(f"ccd_l ({self.ccd_l}) must be >= ccd_s ({self.ccd_s})")
        if not 0 <= self.rfc_ns < self.refi_ns:
            raise ValueError("rfc_ns must be in [0, refi_ns)")
        if self.page_bytes % self.access_bytes:
            raise ValueError("page_bytes must be a multiple of access_bytes")
        return self

    @property
    def banks(self) -> int:
        return self.stacks * self.channels_per_stack * self.pseudo_channels * self.banks_per_pseudo_channel

    @property
    def external_bw(self) -> float:
        """Host-visible bandwidth of all stacks (one access per pseudo-channel per tCCD_S), bytes/s."""
        pcs = self.stacks * self.channels_per_stack * self.pseudo_channels
        return pcs * self.access_bytes / (self.ccd_s * self.tck_ns * 1e-9)

    @property
    def peak_internal_bw(self) -> float:
        """Every bank PU reading at the bus's burst cadence (tCCD_S): the paper's idealisation, bytes/s."""
        return self.banks * self.access_bytes / (self.ccd_s * self.tck_ns * 1e-9)
