"""`l3 pim` figures: capacity, peak and effective attention bandwidth, the time breakdown by mechanism, and
the ablation of L3's three hardware fixes."""

from __future__ import annotations

import numpy as np

from l3.devices.pim.device import PimDevice
from l3.errors import SpecError
from l3.specs.dram import DramSpec
from l3.specs.model import ModelSpec
from l3.specs.pim import PimSpec

MECHANISMS = {
    "compute": "Bank PUs multiply-accumulating K and V read from their own banks, one column per tCCD_L.",
    "row_switch": "Closing and opening rows between row stripes (tRTP, tRP, tRCD; tRAS, tRC and tFAW where "
    "they bind).",
    "refresh": "All-bank refresh every tREFI blocking the rank for tRFC, plus re-opening the interrupted row.",
    "bubble": "Bank PUs idle waiting for the rank PU inside the chunk pipeline: result-buffer reads, the phase "
    "boundary where the context phase needs every score's softmax, and S written back to the shared buffers.",
    "rank_transfer": "Rank-link transfers outside the chunk pipeline: Q into the shared buffers and the "
    "context accumulators of every bank drained to the rank PU.",
    "rank_compute": "Rank-PU adder and softmax work left after the bank side has finished (final sums, "
    "division by the softmax sum; all of the attention arithmetic under the naive layout).",
    "host_write": "Host writes into the rank (Q, the new token's K and V) and the bank timing they trigger.",
    "host_read": "The host reading the attention output back over the channel.",
}

_FIXES = {
    "inflight_relayout": "Without in-flight re-layout the host CPU reads the bytes it wrote back over the "
    "channel, permutes them (its cores' share per rank) and rewrites them so each FP16 value lies in one chip: "
    "every KV write costs three bus passes and the CPU's time in between.",
    "kv_mapping": "With the naive controller layout no bank holds whole FP16 values, so the bank PUs cannot "
    "compute: every K and V byte crosses the rank link (B_rk) and the rank PU does the arithmetic.",
    "bubble_free": "Without bubble-free fusion the buffers are single and the bank PUs wait while the rank PU "
    "drains each chunk, sums and normalises it, and writes S back.",
}


ENERGY_COMPONENTS = {
    "background": "DRAM standby: active (rows open) while a rank works, precharged while it idles (IDD3N, IDD2N).",
    "refresh": "All-bank refreshes: (IDD5B - IDD3N) x tRFC each, one per tREFI per rank.",
    "activate": "Row activations with their precharge: IDD0 over tRC beyond standby, per bank and chip.",
    "host_io": "Host bursts into and out of the rank: Q, new K/V, outputs (IDD4W / IDD4R beyond standby).",
    "bank_read": "Column reads by the bank PUs, each charged a full burst read (IDD4R beyond standby).",
    "bank_mac": "Bank-PU FP16 multiplies and accumulates: one per value read and query head served.",
    "rank_pu": "Rank-PU FP32 adds (cross-chip and cross-bank sums) and softmax values.",
    "rank_link": "Bytes between the chips and the rank PU over the DIMM.",
    "buffers": "Shared, result and rank-PU buffer accesses (SRAM energy per byte).",
    "host_cpu": "Host CPUs re-laying out KV (only without in-flight re-layout).",
}


def _check_fits(dev: PimDevice, context: int, batch: int) -> None:
    """SpecError unless `batch` requests of `context` tokens fit the device's KV capacity."""
    if batch * context > dev.kv_capacity_tokens:
        raise SpecError(f"{batch} requests x {context:,} tokens = {batch * context:,} tokens of {dev.model.name} "
                        f"KV: the device ({dev.dram.timing.name} / {dev.dram.org.name}) holds "
                        f"{dev.kv_capacity_tokens:,}; at this context at most {dev.kv_capacity_tokens // context} "
                        f"requests fit")  # fmt: skip


def pim_report(dram: DramSpec, pim: PimSpec, model: ModelSpec, context: int, batch: int) -> dict:
    """Device figures and one decode step's attention for `batch` requests of `context` tokens (default
    placement). Times in s, bandwidths in bytes/s; `breakdown` sums to `step_attention_time_s`. A batch whose
    KV exceeds the device's capacity is a SpecError."""
    dev = PimDevice(dram, pim, model)
    _check_fits(dev, context, batch)
    step = dev.step_attention_time(np.full(batch, context))
    energy = dev.step_attention_energy(np.full(batch, context))
    kv_read = batch * context * model.kv_bytes_per_token
    return {
        "model": model.name,
        "dram": f"{dram.timing.name} / {dram.org.name}",
        "context": context,
        "batch": batch,
        "capacity_bytes": dev.capacity_bytes,
        "kv_capacity_tokens": dev.kv_capacity_tokens,
        "n_hc": dev.n_hc,
        "peak_attention_bw_bytes_per_s": dev.peak_attention_bw,
        "effective_attention_bw_bytes_per_s": kv_read / step["max"],
        "step_attention_time_s": step["max"],
        "mean_rank_time_s": step["mean"],
        "breakdown": step["breakdown"],
        "mechanisms": MECHANISMS,
        # the whole device (every rank, working or idle) over the step, joules by energy.COMPONENTS
        "energy_j": sum(energy.values()),
        "energy_j_per_token": sum(energy.values()) / batch,
        "energy_j_per_kv_byte": sum(energy.values()) / kv_read,
        "energy_breakdown_j": energy,
        "energy_components": ENERGY_COMPONENTS,
    }


def ablation(dram: DramSpec, pim: PimSpec, model: ModelSpec, context: int, batch: int) -> list[dict]:
    """Step attention time and KV write times with all fixes on (`fix` = "none") and each fix off in turn (a
    batch beyond capacity is a SpecError).
    decode_write_time_s: the busiest channel's new K/V of one decode step; prefill_write_time_s: one
    request's prefill KV of `context` tokens."""
    channels = dram.org.channels
    rows = []
    for fix in ("none", *_FIXES):
        feats = pim.features if fix == "none" else pim.features.model_copy(update={fix: False})
        dev = PimDevice(dram, pim.model_copy(update={"features": feats}), model)
        _check_fits(dev, context, batch)
        step = dev.step_attention_time(np.full(batch, context))["max"]
        rows.append({
            "fix_disabled": fix,
            "step_attention_time_s": step,
            "decode_write_time_s": float(dev.kv_write_time(-(-batch // channels))),
            "prefill_write_time_s": float(dev.kv_write_time(context)),
            "mechanism": _FIXES.get(fix, "All three fixes on."),
        })  # fmt: skip
    base = rows[0]["step_attention_time_s"]
    for r in rows:
        r["slowdown"] = r["step_attention_time_s"] / base
    return rows
