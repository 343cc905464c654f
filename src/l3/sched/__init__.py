"""The scheduler: requests, KV block accounting, plans, policies and predictors. It decides each iteration
and learns only from the times an executor reports; it imports nothing from the executors (`sim`, `systems`,
`engine`), so the simulator and the real engine drive the same code."""

from l3.sched.build import Topology, build_scheduler

__all__ = ["Topology", "build_scheduler"]
