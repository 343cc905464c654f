"""Memory-side attention devices modelled as one pool per replica (the baselines' devices).

Every device answers two questions for one decoder layer: how long decode attention over the given contexts
takes (`read_seconds`), and how long writing new KV takes (`write_seconds`). A replica owns `share` (= 1/dp)
of the machine's device. The mechanism-level devices live beside this one: `cpu.py`, `hbm_pim.py`.
"""

from __future__ import annotations

import numpy as np

from l3.specs.model import ModelSpec


class AttentionDevice:
    """What every pooled device shares: new KV is written at the replica's share of a write bandwidth."""

    variant = "mechanism"

    def __init__(self, model: ModelSpec, write_bandwidth: float, share: float):
        self.write_bw = write_bandwidth * share
        self._kv_layer = model.kv_bytes_per_token_layer

    def read_seconds(self, ctx: np.ndarray) -> np.ndarray:
        """One layer's decode attention; ctx: (steps, requests) tokens attended. Returns (steps,) seconds."""
        raise NotImplementedError

    def write_seconds(self, tokens: float) -> float:
        """Writing `tokens` tokens of one layer's new KV into the device."""
        return tokens * self._kv_layer / self.write_bw


class IdealPool(AttentionDevice):
    """The paper's idealisation: attention streams the KV at peak bandwidth, or computes at peak FLOP/s if
    that is slower (0 FLOP/s: never the limit). Every request spreads over the whole pool."""

    variant = "ideal"

    def __init__(self, model: ModelSpec, bandwidth: float, write_bandwidth: float, flops: float, share: float):
        super().__init__(model, write_bandwidth, share)
        self.bw, self.flops = bandwidth * share, flops * share
        self._flops_per_token = 4.0 * model.head_dim * model.n_heads  # QK^T and SV per KV token, per layer

    def read_seconds(self, ctx: np.ndarray) -> np.ndarray:
        tokens = ctx.sum(axis=-1)
        read = tokens * self._kv_layer / self.bw
        return np.maximum(read, tokens * self._flops_per_token / self.flops) if self.flops > 0 else read
