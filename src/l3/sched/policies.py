"""Sub-batching policies of a scheduler whose memory-side device runs decode attention (`coordination.policy`),
one class each behind a registry keyed by the name a system file uses."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from l3.specs.system import SchedulerSpec


class SubBatchPolicy:
    """How the sub-batch scheduler paces admission and prefill, and whether it learns from measured times."""

    name: ClassVar[str]
    learns: ClassVar[bool] = False  # predictors trained on measured times place decodes, chunk and choose

    def admission_budget(self, spec: SchedulerSpec) -> float:
        """Admit while the prefill work already admitted is below this many tokens."""
        return spec.max_batched_tokens

    def prefill_budget(self, spec: SchedulerSpec, gpu_decodes: int) -> float:
        """Prefill tokens per iteration when `gpu_decodes` decode tokens attend on the GPU (the others attend on
        the memory side and do not eat the token budget)."""
        return max(spec.max_batched_tokens - gpu_decodes, 0)


POLICIES: dict[str, type[SubBatchPolicy]] = {}


def register(cls: type[SubBatchPolicy]) -> type[SubBatchPolicy]:
    POLICIES[cls.name] = cls
    return cls


@register
class Alignment(SubBatchPolicy):
    """L3's: the predicted PIM and GPU times of each sub-batch keep the pipeline aligned (docs/l3-system.md)."""

    name = "alignment"
    learns = True


@register
class Halving(SubBatchPolicy):
    """NeuPIMs-style: decodes split by count, chunked prefill with the usual token budget."""

    name = "halving"


@register
class FillCapacity(SubBatchPolicy):
    """The naive policy the paper compares against: admit and prefill everything that fits memory at once."""

    name = "fill-capacity"

    def admission_budget(self, spec: SchedulerSpec) -> float:
        return np.inf

    def prefill_budget(self, spec: SchedulerSpec, gpu_decodes: int) -> float:
        return np.inf


def get_policy(name: str) -> SubBatchPolicy:
    return POLICIES[name]()
