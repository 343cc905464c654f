"""Area the PIM logic adds (docs/pim.md, "Area"): bank PUs and the shared buffer on every DRAM die, the rank PU
on the DIMM's buffer chip, from the PU spec and the per-unit areas of specs.pim.LOGIC_45NM.

A bank PU has one MAC lane per FP16 value of a column access and query head it serves at once (burst bytes / 2 x
`gqa_reuse_max`): an FP16 multiplier and an accumulator adder (FP32 or FP16) each, and its result buffer. A chip
has a bank PU per bank and one shared buffer. The rank PU has its adder and softmax lanes (a softmax lane: an
FP32 multiplier and adder) and its score and re-layout SRAMs. Areas scale from 45 nm by (node / 45)^2; logic
and SRAM in the DRAM process also take `dram_logic_area_factor` times the area. mm^2 throughout.
"""

from __future__ import annotations

from l3.devices.pim.kernels import FP16_BYTES
from l3.specs.dram import DramSpec
from l3.specs.pim import LOGIC_45NM, PimSpec

UM2 = 1e-6  # mm^2 per um^2


def pim_area(dram: DramSpec, pim: PimSpec) -> dict:
    """Areas (mm^2) of the bank PUs and shared buffer of one DRAM chip, their fraction of a die
    (`pim.energy.dram_die_mm2`), and of one rank PU on the buffer chip."""
    e, bank = pim.energy, pim.bank_pu
    lanes = dram.burst_bytes_per_chip // FP16_BYTES * bank.gqa_reuse_max
    acc = LOGIC_45NM["fp32_add_um2" if bank.accumulate == "fp32" else "fp16_add_um2"]
    dram_scale = (e.bank_pu_node_nm / 45.0) ** 2 * e.dram_logic_area_factor * UM2
    sram = LOGIC_45NM["sram_um2_per_byte"]
    mac = lanes * (LOGIC_45NM["fp16_mul_um2"] + acc) * dram_scale
    result_buffer = bank.result_buffer_bytes * sram * dram_scale
    per_bank = mac + result_buffer
    shared = pim.shared_buffer_bytes * sram * dram_scale
    chip = dram.org.banks_per_chip * per_bank + shared
    rk = pim.rank_pu
    rank_scale = (e.rank_pu_node_nm / 45.0) ** 2 * UM2
    softmax_lane = LOGIC_45NM["fp32_mul_um2"] + LOGIC_45NM["fp32_add_um2"]
    rank_logic = (rk.adder_lanes * LOGIC_45NM["fp32_add_um2"] + rk.softmax_lanes * softmax_lane) * rank_scale
    rank_sram = (rk.score_buffer_bytes + rk.relayout_sram_bytes) * sram * rank_scale
    return {
        "mac_lanes_per_bank": lanes,
        "bank_pu_mac_mm2": mac,
        "bank_pu_buffer_mm2": result_buffer,
        "bank_pu_mm2": per_bank,
        "shared_buffer_mm2": shared,
        "chip_mm2": chip,
        "die_mm2": e.dram_die_mm2,
        "die_fraction": chip / e.dram_die_mm2,
        "rank_pu_logic_mm2": rank_logic,
        "rank_pu_sram_mm2": rank_sram,
        "rank_pu_mm2": rank_logic + rank_sram,
    }


def area_sweep(dram: DramSpec, pim: PimSpec, reuse=(1, 2, 4, 8, 16)) -> list[dict]:
    """`pim_area` as the GQA reuse factor (query heads served per fetched value, hence MAC lanes) grows."""
    rows = []
    for n in reuse:
        a = pim_area(dram, pim.model_copy(update={"bank_pu": pim.bank_pu.model_copy(update={"gqa_reuse_max": n})}))
        rows.append({"gqa_reuse_max": n, **a})
    return rows
