"""The one way any executor gets its schedulers: from the system file's scheduler and coordination specs and
what the executor says of its hardware (`Topology`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from l3.sched.kv import KvPool
from l3.sched.requests import RequestTable, WaitingQueue
from l3.sched.scheduler import ContinuousBatchingScheduler
from l3.sched.subbatch import Spread, SubBatchScheduler
from l3.specs.model import ModelSpec
from l3.specs.system import SystemSpec


@dataclass(frozen=True)
class Topology:
    """What a scheduler knows of one replica's hardware.

    kv_tiers: KV tokens per memory tier (see KvPool); slots: placement slots of a memory-side attention device,
    None where decode attention runs on the GPUs (one batch per iteration); spread: which slots hold how many of
    each request's tokens (default: all at the request's slot); groups: GPU groups one replica's iterations
    are dealt over (each brings its own token and batch budget); overlap: whether one sub-batch's attention runs
    while the other's dense work does (False for an executor that runs a plan's sub-batches one after the other:
    a second sub-batch then only costs, and every iteration runs as one batch); stripe: where the scheduler
    decides the slot of each new chunk of a striped request, the slots of requests' stripes (placement -> (n, D)),
    else None."""

    kv_tiers: tuple[int, ...]
    slots: int | None = None
    spread: Spread | None = None
    groups: int = 1
    overlap: bool = True
    stripe: Callable[[np.ndarray], np.ndarray] | None = None


def build_scheduler(system: SystemSpec, model: ModelSpec, topology: Topology, table: RequestTable,
                    queue: WaitingQueue, replica: int = 0) -> ContinuousBatchingScheduler:  # fmt: skip
    """Replica `replica`'s scheduler: sub-batching under `system.coordination` where a memory-side device
    attends, else continuous batching."""
    spec = system.scheduler
    if topology.groups > 1:
        g = topology.groups
        spec = spec.model_copy(update={"max_batched_tokens": spec.max_batched_tokens * g,
                                       "max_batch_size": spec.max_batch_size * g})  # fmt: skip
    kv = KvPool(topology.kv_tiers, spec.block_size)
    if topology.slots is None:
        return ContinuousBatchingScheduler(spec, kv, table, queue, replica, model)
    return SubBatchScheduler(spec, kv, table, queue, replica, model, system.coordination, topology.slots,
                             topology.spread, topology.overlap, topology.stripe)  # fmt: skip
