"""Workloads: request traces (trace files, a built-in sample, paper-matched synthetic sets)."""

from l3.workload.registry import WORKLOAD_NAMES, load_workload
from l3.workload.workload import Workload

__all__ = ["WORKLOAD_NAMES", "Workload", "load_workload"]
