"""The interface between the executor and a system's timing: iteration -> duration and device busy time."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from l3.sim.plan import BatchShape


@dataclass(frozen=True)
class Interval:
    """A device busy from `start` to `end` seconds after the iteration starts."""

    device: str
    start: float
    end: float
    label: str


@dataclass(frozen=True)
class IterationTiming:
    duration: float  # seconds
    busy: dict[str, float]  # seconds each device was busy during the iteration
    intervals: list[Interval] = field(default_factory=list)


class SystemModel(ABC):
    """Timing of one replica of a deployment. Implementations must be pure functions of their inputs."""

    devices: tuple[str, ...]

    @property
    @abstractmethod
    def kv_capacity_tokens(self) -> int:
        """Whole-model KV tokens one replica can hold."""

    @abstractmethod
    def iteration(self, shape: BatchShape) -> IterationTiming:
        """Time of one (mixed prefill + decode) iteration."""

    @abstractmethod
    def decode_steps(self, n_decode: int, decode_ctx: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Durations (and per-device busy seconds) of repeated decode-only steps, one per `decode_ctx` entry."""
