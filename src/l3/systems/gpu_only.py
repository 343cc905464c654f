"""GPU-only: weights and KV cache in HBM, every operator on the GPUs of a TP group."""

from __future__ import annotations

import numpy as np

from l3.devices.gpu import GpuCostModel
from l3.sim.plan import BatchShape
from l3.specs.system import Deployment
from l3.systems.base import Interval, IterationTiming, SystemModel


class GpuOnlySystem(SystemModel):
    devices = ("gpu",)

    def __init__(self, dep: Deployment):
        self.dep = dep
        self.gpu = GpuCostModel(dep.model, dep.gpu, dep.tp, dep.nvlink, dep.system.gpu.model)
        m = dep.model
        # With fewer KV heads than TP ranks, each KV head is replicated tp / n_kv_heads times.
        replication = max(1, dep.tp // m.n_kv_heads)
        self._kv_tokens = int(dep.hbm_free_bytes // (m.kv_bytes_per_token * replication))

    @property
    def kv_capacity_tokens(self) -> int:
        return self._kv_tokens

    def _time(self, shape: BatchShape, decode_ctx) -> np.ndarray:
        layer = self.gpu.layer(shape.n_tokens, shape.n_decode, decode_ctx, shape.prefill_pairs,
                               shape.prefill_kv_tokens)  # fmt: skip
        return self.dep.model.n_layers * layer.total + self.gpu.lm_head(shape.n_sampled)

    def iteration(self, shape: BatchShape) -> IterationTiming:
        t = float(self._time(shape, shape.decode_ctx))
        label = "prefill+decode" if shape.prefill_tokens else "decode"
        return IterationTiming(t, {"gpu": t}, [Interval("gpu", 0.0, t, label)])

    def decode_steps(self, n_decode: int, decode_ctx: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        shape = BatchShape(n_decode=n_decode, decode_ctx=0.0, n_sampled=n_decode)
        t = self._time(shape, np.asarray(decode_ctx, float))
        return t, {"gpu": t}
