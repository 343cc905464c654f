"""Energy of one rank's DIMM-PIM work, from what the timing engine counts (timing.COUNTS) and its cycles.

DRAM side (per device, times the rank's chips; DramTiming.chip_energy, DRAMsim3's increments): every bank
activation with its precharge; every host column burst (to a bank or to the rank PU window, whose bus transfer
we charge like a DRAM burst); every all-bank column access of the bank PUs at `bank_read_fraction` of a burst
read's energy (1.0 by default: the IDD4R increment also covers the chip's global data path, which a bank PU does
not use; an upper bound, applied to the HBM-PIM baselines alike); standby at IDD3N for the cycles the rank works
(its rows open) and IDD2N while it idles; refresh.
PIM logic (specs.pim.LOGIC_45NM scaled to the PUs' nodes): a bank PU's FP16 multiply and accumulate per value
and query head served; the broadcast operand read from the shared buffer once per chip per all-bank access;
the rank link's bytes and the buffers at both of its ends; the rank PU's adds and softmax values; the host CPUs
re-laying out KV without in-flight re-layout. All energies in joules.
"""

from __future__ import annotations

import numpy as np

from l3.devices.pim.kernels import FP16_BYTES, KernelShape
from l3.devices.pim.timing import COUNTS
from l3.specs.dram import DramSpec
from l3.specs.pim import LOGIC_45NM, PimSpec, mac_j

COMPONENTS = ("background", "refresh", "activate", "host_io", "bank_read", "bank_mac", "rank_pu", "rank_link",
              "buffers", "host_cpu")  # fmt: skip
# The run-level energy breakdown each component belongs to (report.summary ENERGY_PARTS)
PART = {"background": "dram_background", "refresh": "dram_background", "activate": "dram_access",
        "host_io": "dram_access", "bank_read": "dram_access", "bank_mac": "pim_compute", "rank_pu": "pim_compute",
        "rank_link": "pim_compute", "buffers": "pim_compute", "host_cpu": "cpu"}  # fmt: skip
PJ = 1e-12


class PimEnergy:
    """Per-count energies of one rank (`unit`: COUNTS x COMPONENTS, joules) and its standby and refresh."""

    def __init__(self, dram: DramSpec, pim: PimSpec, shape: KernelShape):
        chip, n, e = dram.timing.chip_energy(), dram.org.chips_per_rank, pim.energy
        self.tck_s = dram.timing.tck_ns * 1e-9
        self.active_w, self.precharged_w = n * chip.active_w, n * chip.precharged_w
        self.refresh_j, self.refi_s = n * chip.refresh_j, dram.timing.refi * self.tck_s
        self.static_w = n * dram.timing.chip_static_w()  # a rank with nothing to do: precharged, refreshing
        bank, rank = e.bank_pu_node_nm / 45.0, e.rank_pu_node_nm / 45.0
        mac = mac_j(e.bank_pu_node_nm, pim.bank_pu.accumulate)
        bank_sram, rank_sram = LOGIC_45NM["sram_pj_per_byte"] * bank * PJ, LOGIC_45NM["sram_pj_per_byte"] * rank * PJ
        burst = dram.burst_bytes_per_chip
        values, heads = burst / FP16_BYTES, shape.gqa / shape.passes  # per bank access: values x heads served
        line = burst * n
        u = {c: dict.fromkeys(COMPONENTS, 0.0) for c in COUNTS}
        u["act"]["activate"] = n * chip.act_j
        u["read"]["host_io"] = u["pu_read"]["host_io"] = n * chip.read_j
        u["write"]["host_io"] = u["pu_write"]["host_io"] = n * chip.write_j
        u["pu_read"]["buffers"] = u["pu_write"]["buffers"] = line * rank_sram
        pu_read = n * chip.read_j * e.bank_read_fraction
        u["mac"] |= {"bank_read": pu_read, "bank_mac": n * values * heads * mac,
                     "buffers": n * values * heads * FP16_BYTES * bank_sram / shape.n_bk}  # fmt: skip
        u["load"] |= {"bank_read": pu_read, "buffers": n * burst * bank_sram}
        u["stream"]["bank_read"] = n * chip.read_j
        u["link_bytes"] |= {"rank_link": n * 8 * e.rank_link_pj_per_bit * PJ, "buffers": n * (bank_sram + rank_sram)}
        u["rpu_add"]["rank_pu"] = LOGIC_45NM["fp32_add_pj"] * rank * PJ
        u["rpu_softmax"]["rank_pu"] = (e.softmax_ops_per_value * (LOGIC_45NM["fp32_mul_pj"] + LOGIC_45NM["fp32_add_pj"])
                                       * rank * PJ)  # fmt: skip
        u["host_bytes"]["host_cpu"] = e.host_cpu_w / pim.host_relayout_bw
        self.unit = np.array([[u[c][k] for k in COMPONENTS] for c in COUNTS])

    def of(self, counts: np.ndarray, cycles: np.ndarray, refreshes: np.ndarray, dynamic: bool = False) -> np.ndarray:
        """Energy by COMPONENTS (..., components) of ranks with these counts (..., COUNTS), working `cycles` with
        `refreshes` refreshes. `dynamic`: only what the work adds to the rank's `static_w` (active standby above
        precharged standby; its refreshes are in the static rate)."""
        out = np.asarray(counts, float) @ self.unit
        standby = self.active_w - (self.precharged_w if dynamic else 0.0)
        out[..., COMPONENTS.index("background")] += np.asarray(cycles, float) * self.tck_s * standby
        if not dynamic:
            out[..., COMPONENTS.index("refresh")] += np.asarray(refreshes, float) * self.refresh_j
        return out

    def idle(self, seconds) -> np.ndarray:
        """Energy by COMPONENTS of one rank idle (rows closed, refreshing every tREFI) for `seconds`."""
        s = np.asarray(seconds, float)
        out = np.zeros((*s.shape, len(COMPONENTS)))
        out[..., COMPONENTS.index("background")] = s * self.precharged_w
        out[..., COMPONENTS.index("refresh")] = s / self.refi_s * self.refresh_j
        return out

    def parts(self, energy: np.ndarray) -> dict[str, np.ndarray]:
        """Energy by COMPONENTS (..., components) summed into the run's parts (sched.timing.ENERGY_PARTS)."""
        out: dict[str, np.ndarray] = {}
        for k, c in enumerate(COMPONENTS):
            out[PART[c]] = out.get(PART[c], 0.0) + energy[..., k]
        return out


def result_energy(model: PimEnergy, result) -> dict[str, float]:
    """An EngineResult's energy by COMPONENTS."""
    counts = np.array([result.counts[c] for c in COUNTS])
    return dict(zip(COMPONENTS, model.of(counts, result.cycles, result.refreshes).tolist(), strict=True))
