"""Bank-level HBM-PIM attention (AttAcc / NeuPIMs-like) under HBM timing, mechanism level.

A request's K (then V) of one layer is spread evenly over every bank of the replica's stacks; all bank PUs
work in lockstep on it (all-bank mode), each reading its own bank one column access per tCCD_L. Per bank and
matrix: ceil(bytes / access) accesses, and ceil(bytes / page) rows, each opened and closed (tRCD + tRP) while
the PUs wait (all banks switch rows together). With GQA group g, a PU that serves `gqa_reuse_max` query heads
per fetched element needs ceil(g / gqa_reuse_max) passes of MACs per access. Requests run one after another;
refresh stretches the total by 1 / (1 - tRFC/tREFI). New KV is written through the external interface.
"""

from __future__ import annotations

import numpy as np

from l3.devices.attention_pool import AttentionDevice
from l3.specs.hbm_pim import HbmPimSpec
from l3.specs.model import ModelSpec


class HbmPimAttention(AttentionDevice):
    def __init__(self, spec: HbmPimSpec, model: ModelSpec, write_bandwidth: float, share: float):
        super().__init__(model, write_bandwidth, share)
        self.spec = spec
        self.banks = spec.banks * share
        t = spec.tck_ns * 1e-9
        self._access_s = spec.ccd_l * t * -(-model.gqa_group // spec.gqa_reuse_max)
        self._row_s = (spec.rcd_ns + spec.rp_ns) * 1e-9
        self._stretch = 1.0 / (1.0 - spec.rfc_ns / spec.refi_ns)

    def read_seconds(self, ctx: np.ndarray) -> np.ndarray:
        per_bank = ctx * (self._kv_layer / 2) / self.banks  # bytes of K (and of V) in each bank, per request
        s = self.spec
        one = np.ceil(per_bank / s.access_bytes) * self._access_s + np.ceil(per_bank / s.page_bytes) * self._row_s
        return 2.0 * np.where(ctx > 0, one, 0.0).sum(axis=-1) * self._stretch
