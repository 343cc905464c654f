"""The interface between the executor and a system's timing: iteration -> duration and device busy time."""

from __future__ import annotations

from abc import ABC, abstractmethod

from l3.sched import Topology
from l3.sched.plan import Plan
from l3.sched.requests import RequestTable
from l3.sched.timing import IterationTiming


class SystemModel(ABC):
    """Timing of one replica of a deployment. Implementations must be pure functions of their inputs.

    A replica is what the executor schedules on its own: usually one DP group of GPUs (`replicas` = dp). A
    system whose memory side is one pool for every DP group (l3 with `pim.shared`) is one replica whose
    iterations are dealt over `groups` GPU groups."""

    devices: tuple[str, ...]
    attention_model = "mechanism"  # "ideal" where decode attention runs at a device's peak (the paper's baselines)
    groups = 1  # TP groups of GPUs one replica deals its iterations over

    @property
    def replicas(self) -> int:
        """Replicas the executor runs: the deployment's DP groups divided into groups per replica."""
        return self.dep.dp // self.groups

    @property
    @abstractmethod
    def kv_capacity_tokens(self) -> int:
        """Whole-model KV tokens one replica can hold."""

    @property
    def kv_tiers(self) -> tuple[int, ...]:
        """KV tokens per memory tier of one replica (see KvPool); one tier unless a system keeps KV in two."""
        return (self.kv_capacity_tokens,)

    def topology(self) -> Topology:
        """What the scheduler of one replica knows of it (no memory-side attention here: one batch)."""
        return Topology(kv_tiers=self.kv_tiers, groups=self.groups)

    def static_power(self) -> dict[str, float]:
        """Power one replica draws whatever it does, W, by sched.timing.ENERGY_PARTS: its GPUs' static power
        (and, where KV lives in DIMMs, their standby and refresh)."""
        return {"gpu_idle": self.dep.tp * self.groups * self.dep.gpu.idle_w}

    @property
    @abstractmethod
    def attention_bw(self) -> float:
        """Peak bandwidth (bytes/s) at which one replica's decode attention can read its KV cache."""

    @abstractmethod
    def run(self, plan: Plan, table: RequestTable, steps: int, record: bool = False) -> IterationTiming:
        """Time of `plan` repeated `steps` times (steps > 1 only for decode-only plans; each step every decode
        request's context grows by one). `record` asks for the device intervals of a single step."""
