"""GPU-only: weights and KV cache in HBM, every operator on the GPUs of a TP group."""

from __future__ import annotations

import numpy as np

from l3.devices.gpu import GpuCostModel
from l3.sched.plan import BatchShape, Plan
from l3.sched.requests import RequestTable
from l3.sched.timing import Interval, IterationTiming
from l3.specs.system import Deployment
from l3.systems.base import SystemModel


class GpuOnlySystem(SystemModel):
    devices = ("gpu",)

    def __init__(self, dep: Deployment):
        self.dep = dep
        self.gpu = GpuCostModel(dep.model, dep.gpu, dep.tp, dep.nvlink, dep.system.gpu.model)
        self._kv_tokens = dep.hbm_kv_tokens

    @property
    def kv_capacity_tokens(self) -> int:
        return self._kv_tokens

    @property
    def attention_bw(self) -> float:
        """HBM bandwidth of the TP group's GPUs."""
        return self.dep.tp * self.dep.gpu.hbm_bw

    def time(self, shape: BatchShape) -> np.ndarray:
        """Seconds of one iteration of `shape` (vectorised over `shape.decode_ctx`)."""
        layer = self.gpu.layer(shape.n_tokens, shape.n_decode, shape.decode_ctx, shape.prefill_pairs,
                               shape.prefill_kv_tokens)  # fmt: skip
        return self.dep.model.n_layers * layer.total + self.gpu.embed_and_head(shape.n_tokens, shape.n_sampled)

    def run(self, plan: Plan, table: RequestTable, steps: int, record: bool = False) -> IterationTiming:
        shape = BatchShape.of(plan, table.context(plan.decode_ids))
        if steps > 1:
            ctx = shape.decode_ctx + shape.n_decode * np.arange(steps, dtype=float)
            shape = BatchShape(shape.n_decode, ctx, n_sampled=shape.n_sampled)
        t = np.atleast_1d(self.time(shape)).astype(float)
        label = "prefill+decode" if shape.prefill_tokens else "decode"
        intervals = [Interval("gpu", 0.0, float(t[0]), label)] if record else []
        bound = np.broadcast_to(self.bound(shape), t.shape)
        flops, nbytes = self._attention_work(shape)
        energy = self.gpu.energy(shape.n_tokens, shape.n_sampled, flops, nbytes,
                                 kv_write_bytes=shape.n_tokens * self.dep.model.kv_bytes_per_token)  # fmt: skip
        return IterationTiming(t, {"gpu": t}, intervals=intervals, bound=bound, losses={"gpu_overheads": t - bound},
                               energy={k: np.broadcast_to(v, t.shape) for k, v in energy.items()})  # fmt: skip

    def _attention_work(self, shape: BatchShape) -> tuple[np.ndarray, np.ndarray]:
        """FLOPs and KV bytes of the iteration's prefill and decode attention (all on the GPUs)."""
        pf, pb = self.gpu.attention_work(shape.prefill_pairs, shape.prefill_kv_tokens)
        df, db = self.gpu.attention_work(shape.decode_ctx, shape.decode_ctx)
        return pf + df, pb + db

    def bound(self, shape: BatchShape) -> np.ndarray:
        """The roofline of the iteration: dense work, prefill and decode attention (their KV is in HBM)."""
        return self.gpu.roofline(shape.n_tokens, shape.n_sampled, *self._attention_work(shape))
