"""The interface between the executor and a system's timing: iteration -> duration and device busy time."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from l3.sim.plan import Plan
from l3.sim.requests import RequestTable


@dataclass(frozen=True)
class Interval:
    """A device busy from `start` to `end` seconds after the iteration starts."""

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
    intervals: list[Interval] = field(default_factory=list)  # only for single steps, when asked

    @property
    def duration(self) -> float:
        return float(self.durations.sum())


class SystemModel(ABC):
    """Timing of one replica of a deployment. Implementations must be pure functions of their inputs."""

    devices: tuple[str, ...]
    attention_model = "mechanism"  # "ideal" where decode attention runs at a device's peak (the paper's baselines)

    @property
    @abstractmethod
    def kv_capacity_tokens(self) -> int:
        """Whole-model KV tokens one replica can hold."""

    @property
    def kv_tiers(self) -> tuple[int, ...]:
        """KV tokens per memory tier of one replica (see KvPool); one tier unless a system keeps KV in two."""
        return (self.kv_capacity_tokens,)

    @property
    @abstractmethod
    def attention_bw(self) -> float:
        """Peak bandwidth (bytes/s) at which one replica's decode attention can read its KV cache."""

    @abstractmethod
    def run(self, plan: Plan, table: RequestTable, steps: int, record: bool = False) -> IterationTiming:
        """Time of `plan` repeated `steps` times (steps > 1 only for decode-only plans; each step every decode
        request's context grows by one). `record` asks for the device intervals of a single step."""
