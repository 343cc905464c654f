"""Decode attention on the host CPU's cores over KV in its DRAM (CPU offloading, NEO-like), mechanism level.

Per layer, a request's attention streams its K and V (FP16) from DRAM once and, per fetched element, widens
it to FP32 and does one multiply-add per query head sharing it (GQA group g): 2 g FLOP. Memory and arithmetic
overlap (hardware prefetch, out-of-order cores), so a layer takes the longer of
- memory: KV bytes / (channels x bus width x pin rate x (1 - tRFC/tREFI)): the DRAM bus idles during refresh;
- compute: elements x (1 / widen rate + 2 g / FP32 FLOP per cycle) / (cores x clock).
A replica owns `share` of the cores and channels. Softmax (g exponentials per token and KV head, against
head_dim loads) and reductions are left out: under 1% of the element work for head_dim 128.
"""

from __future__ import annotations

import numpy as np

from l3.devices.attention_pool import AttentionDevice
from l3.specs.hardware import CpuSpec
from l3.specs.model import ModelSpec


class CpuAttention(AttentionDevice):
    def __init__(self, cpu: CpuSpec, model: ModelSpec, write_bandwidth: float, share: float):
        up = 1.0 - cpu.timing.refresh_fraction  # the DRAM bus idles during refresh
        super().__init__(model, write_bandwidth * up, share)
        self.bw = cpu.peak_bw * share * up  # sustained read, bytes/s
        cycles_per_element = 1.0 / cpu.fp16_to_fp32_per_cycle + 2.0 * model.gqa_group / cpu.fp32_flops_per_cycle
        self.element_rate = cpu.cores * share * cpu.clock_ghz * 1e9 / cycles_per_element  # KV elements/s
        self._elements = model.kv_bytes_per_token_layer / model.dtype_bytes

    def read_seconds(self, ctx: np.ndarray) -> np.ndarray:
        tokens = ctx.sum(axis=-1)
        return np.maximum(tokens * self._kv_layer / self.bw, tokens * self._elements / self.element_rate)
