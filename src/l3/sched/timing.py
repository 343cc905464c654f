"""What an executor reports of one plan (the timing record a scheduler's predictors learn from), and where an
iteration's time beyond the hardware's bound goes. Shared by the simulated and the real executor."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np


class Interval(NamedTuple):
    """A device busy from `start` to `end` seconds after the iteration starts (a tuple: a recorded iteration
    makes thousands)."""

    device: str
    start: float
    end: float
    label: str
    layer: int = -1  # decoder layer, where the interval belongs to one


@dataclass(frozen=True)
class IterationTiming:
    """What the executor measures of one plan: per-step durations, device busy time, and per-sub-batch
    GPU and memory-side times (what a scheduler's predictors learn from). Arrays have one entry per step."""

    durations: np.ndarray  # seconds, one per step
    busy: dict[str, np.ndarray]  # seconds each device was busy, per step
    sub_gpu_s: np.ndarray | None = None  # (steps, sub-batches): GPU seconds of each sub-batch
    sub_mem_s: np.ndarray | None = None  # (steps, sub-batches): memory-side attention seconds of each sub-batch
    stats: dict[str, np.ndarray] = field(default_factory=dict)  # per step: extra quantities to average
    intervals: Sequence[Interval] = field(default_factory=list)  # only for single steps, when asked
    bound: np.ndarray | None = None  # per step: the hardware's lower bound on its duration (see LOSSES)
    losses: dict[str, np.ndarray] = field(default_factory=dict)  # per step: duration - bound, by cause (LOSSES)
    energy: dict[str, np.ndarray] = field(default_factory=dict)  # per step: dynamic joules by ENERGY_PARTS

    @property
    def duration(self) -> float:
        return float(self.durations.sum())


# Where a run's energy goes (joules; docs/energy.md). Iterations report the dynamic parts (work done); the static
# parts (gpu_idle, and dram_background's standby and refresh) are the system's static power over the whole run.
ENERGY_PARTS = {
    "gpu_compute": "tensor-core FLOPs of the dense layers, the LM head and attention run on the GPUs",
    "gpu_memory": "HBM bytes: weights read once per sub-batch, activations of the memory-bound kernels, KV",
    "gpu_idle": "the GPUs' static power over the whole run, computing or waiting",
    "nvlink": "tensor-parallel all-reduce bytes over NVLink",
    "pcie": "bytes over the GPUs' host links: Q/K/V up, outputs and partials down, KV moving between tiers",
    "dram_background": "DRAM standby (precharged; active while a unit works) and refresh of the memory-side DIMMs",
    "dram_access": "DRAM row activations, column reads and writes (host and processing units), HBM-PIM reads",
    "pim_compute": "PIM logic: bank-PU multiply-accumulates, rank-PU adds and softmax, rank links and buffers",
    "cpu": "host CPU cores attending (CPU offloading), merging partials or re-laying out KV",
}

# Where an iteration's time beyond its bound goes. The bound is max(GPU side, memory side): the GPU side is the
# dense work at the GPU model's FLOP rate or every weight read once at its HBM rate (GpuCostModel.roofline);
# the memory side is all KV the step attends read at the attention device's peak bandwidth, perfectly spread
# over its units. The causes are charged on the side that bounds the step, and add up to duration - bound:
LOSSES = {
    "gpu_overheads": "GPU time beyond the roofline: tile padding, kernel latency, norms, all-reduce",
    "weight_rereads": "GPU time re-reading the weights for the second sub-batch",
    "device_overheads": "memory-side unit time beyond streaming the KV at peak: writes, row switches, fixed costs",
    "idle_units": "memory-side units with nothing to attend in the iteration while others work",
    "imbalance": "the busiest unit's time beyond the mean working unit's (over the iteration)",
    "transfers": "waits on the host links in series with attention (Q/K/V up, outputs down)",
    "serialisation": "other waits of the bounding side: the GPU waiting for attention, or the busiest unit waiting "
    "for its next layer's inputs (behind the slowest unit of each layer, the GPU, sub-batch alignment)",
}

# Lower edges of the bins of memory-side decodes per sub-batch by which the per-layer unit imbalance is also
# reported (`rank_load_imbalance_by_device_decodes`): the chunks of a few requests cannot spread evenly over
# many units, so the imbalance depends on how many requests the memory side attends at once.
IMBALANCE_DECODE_BINS = (1, 4, 16, 64)


def decode_bin(n_decodes: int) -> int:
    """The lower edge of the `IMBALANCE_DECODE_BINS` bin holding `n_decodes` (>= 1) memory-side decodes."""
    return max(lo for lo in IMBALANCE_DECODE_BINS if lo <= n_decodes)
