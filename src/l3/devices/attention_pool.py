"""Memory-side attention devices modelled as one pool per replica (the baselines' devices).

Every device answers two questions for one decoder layer: how long decode attention over the given contexts
takes (`read_seconds`), and how long writing new KV takes (`write_seconds`). A replica owns `share` (= 1/dp)
of the machine's device. The mechanism-level devices live beside this one: `cpu.py`, `hbm_pim.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from l3.specs.model import ModelSpec


@dataclass(frozen=True)
class PoolEnergy:
    """A pooled device's energy figures (one replica's share; docs/energy.md): per KV byte read and written,
    per multiply-accumulate (a KV element times a query head) and where it is charged, the power of the units
    while they attend (CPU cores), and the static power of the memory holding the KV (DIMM standby and refresh;
    HBM's is in the GPUs' static power)."""

    read_j_per_byte: float
    write_j_per_byte: float
    mac_j: float
    mac_part: str  # "pim_compute" (bank or rank PUs) or "cpu"
    busy_w: float
    static_w: float


class AttentionDevice:
    """What every pooled device shares: new KV is written at the replica's share of a write bandwidth."""

    variant = "mechanism"
    energy_spec: PoolEnergy | None = None  # set by the system that builds the device

    def __init__(self, model: ModelSpec, write_bandwidth: float, share: float):
        self.write_bw = write_bandwidth * share
        self._kv_layer = model.kv_bytes_per_token_layer
        self._macs_per_token = model.kv_bytes_per_token_layer / model.dtype_bytes * model.gqa_group

    def energy(self, ctx: np.ndarray, write_tokens: float, seconds: np.ndarray) -> dict[str, np.ndarray]:
        """Dynamic energy (J, by sched.timing.ENERGY_PARTS) of one layer: attention over ctx (steps, requests)
        tokens, `write_tokens` tokens of new KV written, the units busy `seconds` (steps,)."""
        e = self.energy_spec
        tokens = np.asarray(ctx, float).sum(axis=-1)
        out = {"dram_access": tokens * self._kv_layer * e.read_j_per_byte
               + write_tokens * self._kv_layer * e.write_j_per_byte}  # fmt: skip
        out[e.mac_part] = out.get(e.mac_part, 0.0) + tokens * self._macs_per_token * e.mac_j
        if e.busy_w:
            out["cpu"] = out.get("cpu", 0.0) + np.asarray(seconds, float) * e.busy_w
        return out

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
