"""DRAM timing and organisation presets (DDR4, DDR5). Capacity and bandwidth are derived, never typed in.

Timing values are in command-clock cycles (nCK) of period `tck_ns`. Sources per preset in `source`; the
facts are collected in docs/pim.md. Convention: a *channel* is one independent command/data bus: a 64-bit DDR4
channel, or one 32-bit DDR5 subchannel (a DDR5 DIMM has two), as in Ramulator2.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import model_validator

from l3.specs.base import SpecModel, lookup, require_positive


class DramPower(SpecModel):
    """Datasheet supply voltage (V) and IDD currents (mA) of one DRAM device, as DRAMsim3 and the Micron power
    calculator use them: activate-precharge IDD0, precharge standby IDD2N, active standby IDD3N, burst read /
    write IDD4R / IDD4W, all-bank refresh burst IDD5B."""

    vdd: float
    idd0: float
    idd2n: float
    idd3n: float
    idd4r: float
    idd4w: float
    idd5b: float
    source: str = ""

    @model_validator(mode="after")
    def _check(self) -> DramPower:
        require_positive(self, ("vdd", "idd0", "idd2n", "idd3n", "idd4r", "idd4w", "idd5b"))
        if not self.idd2n <= self.idd3n < min(self.idd4r, self.idd4w, self.idd5b):
            raise ValueError("expected idd2n <= idd3n < idd4r, idd4w, idd5b")
        return self


@dataclass(frozen=True)
class ChipEnergy:
    """One device's energy per command (J) and standby power (W), DRAMsim3's increments: an activation (with
    its precharge) costs VDD (IDD0 tRC - IDD3N tRAS - IDD2N tRP); a burst read or write VDD (IDD4R|W - IDD3N)
    over the burst; a refresh VDD (IDD5B - IDD3N) tRFC; standby VDD IDD3N with a row open, VDD IDD2N without."""

    act_j: float
    read_j: float
    write_j: float
    refresh_j: float
    active_w: float
    precharged_w: float


class DramTiming(SpecModel):
    name: str
    tck_ns: float
    burst_cycles: int  # nBL: data-bus cycles of one burst (DDR4 BL8 -> 4, DDR5 BL16 -> 8)
    cl: int
    cwl: int
    rcd: int
    rp: int
    ras: int
    rc: int
    ccd_s: int
    ccd_l: int
    ccd_l_wr: int | None = None  # DDR5 same-bank-group write-to-write; None = ccd_l
    rrd_s: int
    rrd_l: int
    faw: int
    wtr_s: int
    wtr_l: int
    wr: int
    rtp: int
    rtrs: int = 1  # rank-to-rank data-bus switch
    rfc: int  # all-bank refresh cycle time
    refi: int  # refresh interval
    power: DramPower  # the device's currents at this speed bin (datasheets give IDD per speed bin)
    source: str = ""

    @model_validator(mode="after")
    def _check(self) -> DramTiming:
        if self.tck_ns <= 0:
            raise ValueError("tck_ns must be > 0")
        require_positive(self, ("burst_cycles", "cl", "cwl", "rcd", "rp", "ras", "rc", "ccd_s", "ccd_l", "rrd_s",
                                "rrd_l", "faw", "wtr_s", "wtr_l", "wr", "rtp", "rfc", "refi"), " cycles")  # fmt: skip
        if self.rc < self.ras + self.rp:
            raise ValueError(f"rc ({self.rc}) must be >= ras + rp ({self.ras + self.rp})")
        if self.ccd_l < self.ccd_s:
            raise ValueError(f"ccd_l ({self.ccd_l}) must be >= ccd_s ({self.ccd_s})")
        if self.refi <= self.rfc:
            raise ValueError(f"refi ({self.refi}) must exceed rfc ({self.rfc})")
        return self

    @property
    def data_rate_mts(self) -> float:
        """Transfers per second per pin, in MT/s (double data rate)."""
        return 2000.0 / self.tck_ns

    def ns(self, cycles: float) -> float:
        return cycles * self.tck_ns

    def stream_j_per_byte(self, write: bool = False, width_bits: int = 8, page_bytes: int = 1024) -> float:
        """Energy per byte of streaming whole rows through x`width_bits` devices of `page_bytes` pages (one
        activation per page, a burst per column), J/B."""
        e, burst = self.chip_energy(), width_bits * 2 * self.burst_cycles / 8
        return ((e.write_j if write else e.read_j) + e.act_j * burst / page_bytes) / burst

    def chip_static_w(self) -> float:
        """One device's power with nothing to do, W: precharged standby and a refresh every tREFI."""
        e = self.chip_energy()
        return e.precharged_w + e.refresh_j / (self.refi * self.tck_ns * 1e-9)

    def chip_energy(self) -> ChipEnergy:
        """Per-device command energies and standby powers from `power` (mA x V x ns = pJ)."""
        p, ns = self.power, self.tck_ns
        pj = 1e-12
        return ChipEnergy(
            act_j=p.vdd * (p.idd0 * self.rc - p.idd3n * self.ras - p.idd2n * self.rp) * ns * pj,
            read_j=p.vdd * (p.idd4r - p.idd3n) * self.burst_cycles * ns * pj,
            write_j=p.vdd * (p.idd4w - p.idd3n) * self.burst_cycles * ns * pj,
            refresh_j=p.vdd * (p.idd5b - p.idd3n) * self.rfc * ns * pj,
            active_w=p.vdd * p.idd3n * 1e-3, precharged_w=p.vdd * p.idd2n * 1e-3)  # fmt: skip

    @property
    def refresh_fraction(self) -> float:
        """Fraction of time a rank is blocked by all-bank refresh (tRFC / tREFI)."""
        return self.rfc / self.refi


class DramOrg(SpecModel):
    name: str
    channels: int
    dimms_per_channel: int
    ranks_per_dimm: int
    chips_per_rank: int
    device_width_bits: int  # x4 / x8 / x16
    bank_groups: int
    banks_per_group: int
    rows: int
    columns: int  # column addresses per row; one column = device_width bits
    subchannels_per_dimm: int = 1  # channels one DIMM serves (DDR5: its two 32-bit subchannels)
    source: str = ""

    @model_validator(mode="after")
    def _check(self) -> DramOrg:
        require_positive(self, ("channels", "dimms_per_channel", "ranks_per_dimm", "chips_per_rank", "bank_groups",
                                "banks_per_group", "rows", "columns", "subchannels_per_dimm"))  # fmt: skip
        if self.device_width_bits not in (4, 8, 16):
            raise ValueError("device_width_bits must be 4, 8 or 16")
        if self.channels % self.subchannels_per_dimm:
            raise ValueError(f"channels ({self.channels}) must be a multiple of subchannels_per_dimm "
                             f"({self.subchannels_per_dimm})")  # fmt: skip
        return self

    # --- derived organisation ------------------------------------------------------------------
    @property
    def banks_per_chip(self) -> int:
        return self.bank_groups * self.banks_per_group

    @property
    def ranks_per_channel(self) -> int:
        return self.dimms_per_channel * self.ranks_per_dimm

    @property
    def ranks(self) -> int:
        return self.channels * self.ranks_per_channel

    @property
    def chips(self) -> int:
        return self.ranks * self.chips_per_rank

    @property
    def banks(self) -> int:
        return self.chips * self.banks_per_chip

    @property
    def dimms(self) -> int:
        """DIMMs installed (a DDR5 DIMM serves two subchannels, each counted as a channel)."""
        return self.channels * self.dimms_per_channel // self.subchannels_per_dimm

    @property
    def bus_width_bits(self) -> int:
        return self.chips_per_rank * self.device_width_bits

    @property
    def page_bytes(self) -> int:
        """Row size of one chip, bytes."""
        return self.columns * self.device_width_bits // 8

    @property
    def die_bits(self) -> int:
        return self.banks_per_chip * self.rows * self.columns * self.device_width_bits

    @property
    def bank_bytes(self) -> int:
        return self.rows * self.page_bytes

    @property
    def chip_bytes(self) -> int:
        return self.die_bits // 8

    @property
    def rank_bytes(self) -> int:
        return self.chip_bytes * self.chips_per_rank

    @property
    def capacity_bytes(self) -> int:
        return self.rank_bytes * self.ranks


class DramSpec(SpecModel):
    """A memory system: one timing preset on one organisation."""

    timing: DramTiming
    org: DramOrg

    @property
    def burst_bytes_per_chip(self) -> int:
        """Bytes one chip delivers per burst (device width x burst beats)."""
        return self.org.device_width_bits * 2 * self.timing.burst_cycles // 8

    @property
    def channel_peak_bw(self) -> float:
        """External peak bandwidth of one channel, bytes/s."""
        return self.org.bus_width_bits / 8 * self.timing.data_rate_mts * 1e6

    @property
    def external_peak_bw(self) -> float:
        """Peak host-visible bandwidth over all channels, bytes/s."""
        return self.channel_peak_bw * self.org.channels


_DDR4_POWER = DramPower(vdd=1.2, idd0=57, idd2n=37, idd3n=52, idd4r=168, idd4w=150, idd5b=250,
                        source="DRAMsim3 configs/DDR4_8Gb_x8_3200.ini [power]")
_DDR4_3200 = DramTiming(
    name="ddr4-3200", tck_ns=0.625, burst_cycles=4, cl=22, cwl=16, rcd=22, rp=22, ras=52, rc=74,
    ccd_s=4, ccd_l=8, rrd_s=4, rrd_l=8, faw=34, wtr_s=4, wtr_l=12, wr=24, rtp=12, rtrs=1, rfc=560, refi=12480,
    power=_DDR4_POWER,
    source="L3 paper Table I; DRAMsim3 configs/DDR4_8Gb_x8_3200.ini (tFAW, tRFC 350 ns, tREFI 7.8 us, tRTRS, IDD)",
)  # fmt: skip

_DDR5_SRC = "Ramulator2 python/ramulator/dram/ddr5.py timing_presets (JEDEC-style AN bins); tRFC1 16Gb"
# No DDR5 IDD table is among our sources (DRAMsim3 stops at DDR4): our assumption is DDR4-3200's currents at
# DDR5's 1.1 V core supply (docs/energy.md).
_DDR5_POWER = _DDR4_POWER.model_copy(update={"vdd": 1.1, "source": "assumption: DDR4-3200 currents (DRAMsim3) at "
                                                                   "DDR5's 1.1 V VDD"})


def _ddr5(rate, tck, cl, ras, rc, cwl, wr, rtp, ccd_l, ccd_l_wr, wtr_s, wtr_l, rrd_s, rrd_l, faw, rfc, refi):
    return DramTiming(
        name=f"ddr5-{rate}", tck_ns=tck, burst_cycles=8, cl=cl, cwl=cwl, rcd=cl, rp=cl, ras=ras, rc=rc,
        ccd_s=8, ccd_l=ccd_l, ccd_l_wr=ccd_l_wr, rrd_s=rrd_s, rrd_l=rrd_l, faw=faw, wtr_s=wtr_s, wtr_l=wtr_l,
        wr=wr, rtp=rtp, rtrs=2, rfc=rfc, refi=refi, power=_DDR5_POWER, source=_DDR5_SRC,
    )  # fmt: skip


TIMING_PRESETS: dict[str, DramTiming] = {
    t.name: t
    for t in [
        _DDR4_3200,
        _ddr5(4800, 2000 / 4800, 34, 77, 111, 32, 72, 18, 12, 48, 6, 24, 8, 12, 48, 710, 9375),
        _ddr5(5600, 2000 / 5600, 40, 90, 130, 38, 84, 20, 12, 56, 5, 28, 14, 14, 56, 827, 10925),
        _ddr5(6400, 2000 / 6400, 46, 103, 149, 44, 96, 24, 16, 64, 5, 32, 16, 16, 64, 946, 12500),
    ]
}

ORG_PRESETS: dict[str, DramOrg] = {
    o.name: o
    for o in [
        # The L3 paper's platform: 16 channels x 2 DIMMs x 2 ranks x 8 x8 chips, 2 TB. 2 TB over 512 chips needs
        # 32 Gb dies; we keep DDR4's 8 Gb geometry (16 banks, 1 KB page) and assume 4x the rows (262144).
        DramOrg(name="ddr4-l3-2tb", channels=16, dimms_per_channel=2, ranks_per_dimm=2, chips_per_rank=8,
                device_width_bits=8, bank_groups=4, banks_per_group=4, rows=262144, columns=1024,
                source="L3 paper Sec. 4 (16 ch x 2 DIMM x 2 rank, 2 TB); die density 32 Gb is our assumption"),
        DramOrg(name="ddr4-8gb-x8-1ch", channels=1, dimms_per_channel=1, ranks_per_dimm=1, chips_per_rank=8,
                device_width_bits=8, bank_groups=4, banks_per_group=4, rows=65536, columns=1024,
                source="DRAMsim3 DDR4_8Gb_x8_3200.ini, one channel with one single-rank DIMM"),
        # DDR5: channel = 32-bit subchannel with 4 x8 chips per rank; 12 DIMM slots x 2 subchannels.
        DramOrg(name="ddr5-32gb-x8-12dimm", channels=24, dimms_per_channel=1, ranks_per_dimm=2, chips_per_rank=4,
                device_width_bits=8, bank_groups=8, banks_per_group=4, rows=131072, columns=1024,
                subchannels_per_dimm=2,
                source="Ramulator2 org_presets DDR5_32Gb_x8; 12 DIMMs (2 subchannels each, 2 ranks) is ours"),
        # A two-socket host with 12 DDR5 channels per socket, one DIMM per channel: 48 subchannels.
        DramOrg(name="ddr5-32gb-x8-24dimm", channels=48, dimms_per_channel=1, ranks_per_dimm=2, chips_per_rank=4,
                device_width_bits=8, bank_groups=8, banks_per_group=4, rows=131072, columns=1024,
                subchannels_per_dimm=2,
                source="Ramulator2 org_presets DDR5_32Gb_x8; 2 sockets x 12 channels x 1 DIMM (2 subchannels, "
                       "2 ranks) = 24 DIMMs, 1.5 TiB, is ours"),
        # Eight CXL memory expanders, each with 4 DDR5 channels of one DIMM: 64 subchannels.
        DramOrg(name="ddr5-32gb-x8-cxl8x4", channels=64, dimms_per_channel=1, ranks_per_dimm=2, chips_per_rank=4,
                device_width_bits=8, bank_groups=8, banks_per_group=4, rows=131072, columns=1024,
                subchannels_per_dimm=2,
                source="Ramulator2 org_presets DDR5_32Gb_x8; 8 expanders x 4 channels x 1 DIMM (2 subchannels, "
                       "2 ranks) = 32 DIMMs, 2 TiB, is ours"),
        DramOrg(name="ddr5-16gb-x8-12dimm", channels=24, dimms_per_channel=1, ranks_per_dimm=2, chips_per_rank=4,
                device_width_bits=8, bank_groups=8, banks_per_group=4, rows=65536, columns=1024,
                subchannels_per_dimm=2,
                source="Ramulator2 org_presets DDR5_16Gb_x8; 12 DIMMs (2 subchannels each, 2 ranks) is ours"),
    ]
}  # fmt: skip


def get_timing(name: str) -> DramTiming:
    return lookup(TIMING_PRESETS, name, "DRAM timing preset")


def get_org(name: str) -> DramOrg:
    return lookup(ORG_PRESETS, name, "DRAM organisation preset")
